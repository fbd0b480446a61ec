"""The HTTP gateway on the head: OpenAI's API in front of the router. No model code here."""
