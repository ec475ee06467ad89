"""The Slack bot's parts: the model behind it, its state-DB records, Slack text handling, the event server."""
