"""OpenAI's Responses API on top of chat completions: items in, items out, stored per
project so a conversation can continue from `previous_response_id`."""
