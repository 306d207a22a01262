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


def looks_like_expression(text: str) -> bool:
    """Whether a target text is a metric expression (it calls logit / logprob / prob) rather than a token."""
    import re

    return bool(re.search(r"\b(logit|logprob|prob)\s*\(", text))


def normalise_target(spec, where: str, builtins: tuple[str, ...], literal_tokens: bool) -> None:
    """A `target` field that may be a metric expression (contract 6.2): {"expression": text} becomes the text,
    whose syntax is checked here. Other texts are built-in names, or literal tokens where literal_tokens."""
    from desktop_app.engine.errors import SpecError

    value = spec.target
    if isinstance(value, dict):
        if set(value) != {"expression"} or not isinstance(value["expression"], str):
            raise SpecError(f"{where}: field 'target' must be one of {', '.join(builtins)} or an object "
                            "{\"expression\": \"logit(answer) - logit(wrong)\"}.")
        value = value["expression"]
        object.__setattr__(spec, "target", value)
    if not isinstance(value, str) or value in builtins or (literal_tokens and not looks_like_expression(value)):
        return
    from desktop_app.engine.metric_expr import MetricExpression

    try:
        MetricExpression(value)
    except SpecError as err:
        raise SpecError(f"{where}: field 'target': {err}") from None


def target_to_json(d: dict, builtins: tuple[str, ...], literal_tokens: bool) -> dict:
    """to_dict's target written as {"expression": text} when it is an expression."""
    value = d.get("target")
    if isinstance(value, str) and value not in builtins and (not literal_tokens or looks_like_expression(value)):
        d["target"] = {"expression": value}
    return d
