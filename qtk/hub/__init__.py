"""Acquisition: tokens, resumable verified downloads into the HF cache, and a Hub-compatible mirror."""

from .auth import Identity, Token, get_token, login, logout, whoami
from .download import PullPlan, PullResult, plan_pull, pull

__all__ = ["Identity", "Token", "get_token", "login", "logout", "whoami", "PullPlan", "PullResult", "plan_pull", "pull"]
