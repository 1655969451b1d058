"""Which batch row is what: CFG half, group, source or target.

Methods never hard-code batch positions (`[u_src, u_tgt, c_src, c_tgt]` in MasaCtrl's official
code); they ask the layout. Diffusers batches classifier-free guidance as `[uncond x B, cond x B]`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Row:
    cfg: str  # "uncond" | "cond"
    sample: int  # which image of the call (0..B-1), shared by its uncond and cond rows
    group: int = 0  # images that belong together (a MasaCtrl source and its targets)
    role: str = "plain"  # "plain" | "source" | "target"


@dataclass(frozen=True)
class BatchLayout:
    rows: tuple[Row, ...]

    @staticmethod
    def standard(
        n_samples: int,
        cfg: bool,
        groups: list[int] | None = None,
        roles: list[str] | None = None,
        cfg_only: str | None = None,
    ) -> BatchLayout:
        """`[uncond x B, cond x B]` with CFG, `[cond x B]` without (or only `cfg_only` rows)."""
        groups = groups or [0] * n_samples
        roles = roles or ["plain"] * n_samples
        if len(groups) != n_samples or len(roles) != n_samples:
            raise ValueError(f"groups/roles must have one entry per sample ({n_samples})")
        halves = (["uncond", "cond"] if cfg else ["cond"]) if cfg_only is None else [cfg_only]
        return BatchLayout(
            tuple(Row(h, s, groups[s], roles[s]) for h in halves for s in range(n_samples))
        )

    def as_half(self, cfg: str) -> BatchLayout:
        """The same rows labelled as one CFG half: a pipeline that runs CFG as a separate pass (FLUX true
        CFG, Qwen-Image, FLUX.2 [klein]) sends the uncond rows of a given layout in a forward of their own."""
        return BatchLayout(tuple(replace(r, cfg=cfg) for r in self.rows))

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def n_samples(self) -> int:
        return len({r.sample for r in self.rows})

    def indices(self, cfg: str | None = None, role: str | None = None, group: int | None = None) -> list[int]:
        return [
            i
            for i, r in enumerate(self.rows)
            if (cfg is None or r.cfg == cfg)
            and (role is None or r.role == role)
            and (group is None or r.group == group)
        ]

    def cond_rows(self) -> list[int]:
        return self.indices(cfg="cond")

    def source_of(self) -> list[int]:
        """For each row, the row of its group's source in the same CFG half (itself if none)."""
        out = []
        for i, r in enumerate(self.rows):
            src = [j for j, s in enumerate(self.rows) if s.role == "source" and s.group == r.group and s.cfg == r.cfg]
            out.append(src[0] if src else i)
        return out

