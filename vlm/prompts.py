"""Prompt suffixes LLaVA-1.5 trained and evaluated with; benchmark scores depend on them."""

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


def short_answer_question(question: str, prompt: str) -> str:
    """A short-answer question as training data and `vlm eval` ask it: `prompt` on a line after it, or
    the question alone where `prompt` is empty (model.lm.short_answer_prompt)."""
    return f"{question}\n{prompt}" if prompt else question
