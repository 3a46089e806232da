"""Mounting the console on the app: its routes, its static files, its settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from aicloud.config import Settings
from aicloud.console.routes import router
from aicloud.console.web import ConsoleConfig

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI, settings: Settings) -> None:
    app.state.console = ConsoleConfig(timedelta(minutes=settings.console_session_minutes),
                                      settings.console_sign_in_attempts)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
