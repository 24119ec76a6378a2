"""Local fake third-party HTTP servers (Graph, OpenAI, amoCRM, Bitrix24) on 127.0.0.1."""
