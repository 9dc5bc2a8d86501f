"""Prompt suffixes LLaVA-1.5 trained and evaluated with; benchmark scores depend on them."""

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
