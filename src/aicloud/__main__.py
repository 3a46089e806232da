from aicloud.cli import app

app()
