"""One module per tab of the app: its handlers (methods of a mixin of `AttnEditApp`) and its layout (`build_*`)."""
