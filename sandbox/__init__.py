"""Local sandbox emulating Meta Graph, Instagram Graph, Telegram Bot and OpenAI APIs."""
