"""The Gradio app (`app.py`) and its tabs (`tabs/`), beside the package: `attnedit app` serves it."""

from attnedit.app_cli import private_gradio_dir

private_gradio_dir()  # before any module here imports gradio (it reads GRADIO_TEMP_DIR once): files stay private
