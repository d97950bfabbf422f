"""The OpenAI wire format: chat completions, models, files and batches."""
