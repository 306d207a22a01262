"""What the single-prompt kinds (lenses, attention, direct logit attribution, token attribution) share in their
job factories: the tokens of the chosen prompt, the answer tokens, and the spec's fields as the result's params."""
from __future__ import annotations

from desktop_app.project.kinds import field_values, prompt_text
from desktop_app.project.specs import param

PROMPT_TIP = "clean, corrupted, or a literal text to analyse"


def prompt_field():
    return param("clean", widget="choice", choices=("clean", "corrupted"), editable=True, tip=PROMPT_TIP)


def tokens_of(lm, prompts, spec):
    return lm.tokenize(prompt_text(prompts, spec.prompt), prompts.prepend_bos,
                       what=f"{spec.prompt} prompt" if spec.prompt in ("clean", "corrupted") else "prompt")


def answer_ids(lm, prompts, need_wrong: bool):
    answer = lm.single_token_id(prompts.answer, "answer")
    wrong = lm.single_token_id(prompts.wrong_answer, "wrong answer") if need_wrong else None
    return answer, wrong


def with_spec_params(job, spec):
    """Pass on the job's events; its result records the spec's fields as its params."""
    result = yield from job
    if result is not None:
        result.params = {**result.params, **field_values(spec)}
    return result
