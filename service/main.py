"""What uvicorn imports: ``uvicorn service.main:app``. Settings come from the environment."""

from service.app import create_app

app = create_app()
