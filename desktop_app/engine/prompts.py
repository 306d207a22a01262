"""A clean / corrupted prompt pair with its answer tokens, checked to fit together."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.engine.errors import PromptError
from desktop_app.engine.model import TokenInfo


@dataclass
class PromptPair:
    clean: TokenInfo
    corrupted: TokenInfo
    answer_id: int
    wrong_id: int

    @property
    def n_pos(self) -> int:
        return len(self.clean.ids)


def prepare_pair(lm, clean: str, corrupted: str, answer: str, wrong_answer: str,
                 prepend_bos: bool | None = None, need_corrupted: bool = True,
                 need_wrong: bool = True) -> PromptPair:
    c = lm.tokenize(clean, prepend_bos, what="clean prompt")
    if need_corrupted:
        k = lm.tokenize(corrupted, prepend_bos, what="corrupted prompt")
        if len(k.ids) != len(c.ids):
            raise PromptError(
                f"the clean prompt is {len(c.ids)} tokens and the corrupted prompt {len(k.ids)}; they must have the "
                f"same length so positions line up. clean: {' | '.join(c.display)}  corrupted: {' | '.join(k.display)}")
    else:
        k = c
    a = lm.single_token_id(answer, "answer")
    w = lm.single_token_id(wrong_answer, "wrong answer") if need_wrong else a
    if need_wrong and a == w:
        raise PromptError(f"the answer {answer!r} and the wrong answer {wrong_answer!r} are the same token; "
                          "choose two different tokens.")
    return PromptPair(clean=c, corrupted=k, answer_id=a, wrong_id=w)
