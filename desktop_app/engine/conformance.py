"""The load-time conformance check: do this model's hook points and shortcuts hold, numerically?

On one short prompt (token ids, no tokenizer needed) the engine measures:
- decomposition: resid_pre + attn_out + mlp_out == resid_post for every block (sequential and parallel blocks
  alike), so that attn_out and mlp_out are what the block adds to the residual stream;
- block_form: in a sequential block the MLP reads resid_mid (moving attn_out moves mlp_out), in a parallel one it
  does not; resid_mid exists only in the first case;
- unembed: the adapter's final norm + unembedding of the last residual == the model's own logits;
- restart: a run restarted from block 0 and from a middle block with the recorded block arguments gives the plain
  forward pass's final residual stream (whose unembedding the unembed check covers), the latter for two rows;
- prefix_restart: the same restarted from a later position with the recorded keys and values (prefix reuse);
- hook_z: hook_z through the output projection (and the post-norm, residual multiplier) == attn_out.

An analysis asks for the checks it depends on (`require`); a failed one refuses it in one sentence naming the
check and the measured difference. A failed prefix_restart only turns prefix reuse off (restart from position 0).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from desktop_app.engine.errors import ConformanceError

CHECKS = ("decomposition", "block_form", "unembed", "restart", "prefix_restart", "hook_z")
_WHAT = {
    "decomposition": "resid_pre + attn_out + mlp_out differs from resid_post",
    "block_form": "the MLP's dependence on attn_out does not match the block form the adapter assumes",
    "unembed": "the adapter's unembedding of the final residual differs from the model's logits",
    "restart": "a run restarted from a middle layer differs from the plain forward pass",
    "prefix_restart": "a run restarted from a later position with the recorded keys and values differs from "
                      "the plain forward pass",
    "hook_z": "hook_z through the output projection differs from attn_out",
}
# relative tolerance per dtype, times max(1, the largest magnitude compared)
_REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 6e-2}
PROMPT_LEN = 12


@dataclass
class CheckResult:
    name: str
    passed: bool
    max_abs_diff: float
    tolerance: float
    time_ms: float
    note: str = ""  # why it failed (an exception) or why it does not apply

    def describe(self) -> str:
        if self.note and self.max_abs_diff != self.max_abs_diff:  # NaN: the check could not measure
            return f"{_WHAT[self.name]} ({self.note})"
        if self.name == "block_form":
            return (f"{_WHAT[self.name]}: {self.note}, and it moved by {self.max_abs_diff:.2e} "
                    f"(tolerance {self.tolerance:.1e})")
        return f"{_WHAT[self.name]} by {self.max_abs_diff:.2e} (tolerance {self.tolerance:.1e})"


@dataclass
class Conformance:
    family: str
    checks: dict[str, CheckResult] = field(default_factory=dict)
    total_ms: float = 0.0

    def ok(self, name: str) -> bool:
        check = self.checks.get(name)
        return check is not None and check.passed

    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks.values() if not c.passed]

    def require(self, *names: str, analysis: str) -> None:
        """Raise ConformanceError naming the first failed check among `names` and its measured difference."""
        for name in names:
            check = self.checks.get(name)
            if check is None:
                raise ValueError(f"unknown conformance check {name!r}")
            if not check.passed:
                raise ConformanceError(
                    f"{analysis} is not available for this {self.family} model: the load-time conformance check "
                    f"'{name}' failed ({check.describe()}).")

    def to_dict(self) -> dict:
        """Plain JSON (a difference that could not be measured is null)."""
        def plain(v):
            return None if isinstance(v, float) and v != v else v
        return {"family": self.family, "total_ms": round(self.total_ms, 3),
                "checks": {n: {k: plain(v) for k, v in asdict(c).items() if k != "name"}
                           for n, c in self.checks.items()}}

    def summary(self) -> str:
        bad = [c.name for c in self.failed()]
        state = "all passed" if not bad else f"failed: {', '.join(bad)}"
        return f"conformance ({len(self.checks)} checks, {self.total_ms:.0f} ms): {state}"


def _tolerance(dtype, *refs: torch.Tensor) -> float:
    scale = max([1.0] + [float(r.detach().float().abs().max()) for r in refs if r.numel()])
    return _REL_TOL.get(dtype, 1e-2) * scale


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def _special_ids(config) -> set[int]:
    """Ids the config names (bos, eos, pad, image and other placeholder tokens a multimodal forward would treat
    specially), in the config and its text config."""
    found = set()
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for cfg in configs:
        for key, value in vars(cfg).items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                found.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return found


def probe_ids(lm, n_pos: int = PROMPT_LEN) -> torch.Tensor:
    """A fixed, tokenizer-free prompt: spread-out ordinary ids of the vocabulary."""
    n_pos = max(2, min(n_pos, lm.info.n_ctx))
    vocab = lm.info.vocab_size
    avoid = _special_ids(lm.model.config)
    ids = []
    for i in range(n_pos):
        token = (i * 7919 + 11) % vocab
        while token in avoid and len(avoid) < vocab:
            token = (token + 1) % vocab
        ids.append(token)
    return torch.tensor(ids)


def check_model(lm, n_pos: int = PROMPT_LEN) -> Conformance:
    """Run every check on `lm` (in inference mode) and return the results; never raises for a failed check."""
    from desktop_app.engine.capture import forward_logits, hooks
    from desktop_app.engine.hooknames import hook_name
    from desktop_app.engine.replay import can_start_later, record_run, run_block, run_from_layer

    ids = probe_ids(lm, n_pos)[None]
    n = lm.info.n_layers
    dtype = getattr(torch, lm.info.dtype or "float32", torch.float32)
    conf = Conformance(family=lm.adapter.family)
    state: dict = {}
    t_all = time.perf_counter()

    def measure(name, fn):
        """fn() -> (measured, tolerance, note[, passed]); passed defaults to measured <= tolerance."""
        t0 = time.perf_counter()
        try:
            diff, tol, note, *passed = fn()
            passed = bool(passed[0]) if passed else bool(diff <= tol)
        except Exception as err:  # noqa: BLE001 - any failure of a check is a failed check, never a crash
            diff, tol, note, passed = float("nan"), 0.0, _error_note(err), False
        conf.checks[name] = CheckResult(name, passed, diff, tol, (time.perf_counter() - t0) * 1e3, note)

    def plain():
        names = [hook_name(L, k) for L in range(n) for k in ("resid_pre", "attn_out", "mlp_out", "resid_post",
                                                              "attn.hook_z")]
        with torch.inference_mode(), hooks(lm, read=names) as store:
            state["logits"] = forward_logits(lm, ids)
        state["acts"] = dict(store)

    def decomposition():
        a = state["acts"]
        diffs, refs = [], []
        for L in range(n):
            post = a[hook_name(L, "resid_post")]
            rebuilt = a[hook_name(L, "resid_pre")] + a[hook_name(L, "attn_out")] + a[hook_name(L, "mlp_out")]
            diffs.append(_diff(rebuilt, post))
            refs.append(post)
        return max(diffs), _tolerance(dtype, *refs), ""

    def block_form():
        # move attn_out at every position by a vector of its own size and see whether mlp_out follows; each block
        # runs alone on its recorded input (the restart check's recording), so this costs one forward pass
        a = state["acts"]
        run = state.get("run")
        if run is None:
            raise RuntimeError("the restart check did not record a run")
        changes, refs = [], []
        for L in range(n):
            attn, mlp = a[hook_name(L, "attn_out")], a[hook_name(L, "mlp_out")]
            gen = torch.Generator().manual_seed(L)  # random, not constant: a LayerNorm removes a constant shift
            noise = torch.randn(tuple(attn.shape), generator=gen, dtype=torch.float32)
            delta = (noise * 3.0 * attn.float().std().clamp_min(1e-3)).to(attn.device, attn.dtype)
            with torch.inference_mode(), hooks(lm, read=[hook_name(L, "mlp_out")],
                                               write={hook_name(L, "attn_out"): lambda x, d=delta: x + d}) as st:
                run_block(run, lm, L, run.resid_pre[L])
            changes.append(_diff(st[hook_name(L, "mlp_out")], mlp))
            refs.append(mlp)
        tol = _tolerance(dtype, *refs)
        if lm.adapter.parallel_attn_mlp:  # parallel: mlp_out must not move
            return max(changes), tol, "parallel block: mlp_out must not follow attn_out"
        # sequential: mlp_out must move in every block, by more than the tolerance
        return min(changes), tol, "sequential block: mlp_out must follow attn_out", min(changes) > tol

    def unembed():
        final = state["acts"][hook_name(n - 1, "resid_post")]
        with torch.inference_mode():
            mine = lm.adapter.logits_from_resid(final)
        ref = state["logits"]
        return _diff(mine, ref), _tolerance(dtype, ref), ""

    # restarts from block 0 (every block runs on recorded arguments) and from the middle one (the hand-over of a
    # recorded resid_pre); the latter with two rows, as sweeps batch several patched rows on one recorded run
    restart_layers = sorted({0, n // 2})

    def rows(L):
        return 2 if L == n // 2 else 1

    # the restarts compare the final residual stream at every position (the unembedding is the unembed check's)
    def final_resid():
        return state["acts"][hook_name(n - 1, "resid_post")]

    def restart():
        with torch.inference_mode():
            run = record_run(lm, ids)
            state["run"] = run
            outs = [run_from_layer(lm, run, L, run.resid_pre[L].expand(rows(L), -1, -1), last_only=False,
                                   unembed=False) for L in restart_layers]
        ref = final_resid()
        return max(_diff(o, ref.expand_as(o)) for o in outs), _tolerance(dtype, ref), f"from layers {restart_layers}"

    def prefix_restart():
        run = state.get("run")
        if run is None:
            raise RuntimeError("the restart check did not record a run")
        if not can_start_later(run, 0):
            raise RuntimeError("no recorded keys and values cover the prompt; sweeps restart from position 0")
        # from block 0 at position 1 (one recorded key per layer) and from the middle block at the middle position
        starts = [(0, 1), (n // 2, ids.shape[1] // 2)]
        diffs, refs = [], []
        with torch.inference_mode():
            for L, start in starts:
                out = run_from_layer(lm, run, L, run.resid_pre[L][:, start:].expand(rows(L), -1, -1),
                                     last_only=False, start=start, unembed=False)
                refs.append(final_resid()[:, start:])
                diffs.append(_diff(out, refs[-1].expand_as(out)))
        return max(diffs), _tolerance(dtype, *refs), f"from (layer, position) {starts}"

    def hook_z():
        a = state["acts"]
        diffs, refs = [], []
        for L in range(n):
            z = a[hook_name(L, "attn.hook_z")]
            if z.shape[-2:] != (lm.info.n_heads, lm.info.d_head):
                raise RuntimeError(f"hook_z of layer {L} has shape {tuple(z.shape[-2:])}, expected "
                                   f"({lm.info.n_heads}, {lm.info.d_head})")
            with torch.inference_mode():
                out = lm.adapter.attn_out_from_o_proj_input(L, z.flatten(-2))
            ref = a[hook_name(L, "attn_out")]
            diffs.append(_diff(out, ref))
            refs.append(ref)
        return max(diffs), _tolerance(dtype, *refs), ""

    try:
        plain()
    except Exception as err:  # noqa: BLE001
        note = f"the plain forward pass with hooks failed: {_error_note(err)}"
        for name in CHECKS:
            conf.checks[name] = CheckResult(name, False, float("nan"), 0.0, 0.0, note)
        conf.total_ms = (time.perf_counter() - t_all) * 1e3
        return conf
    for name, fn in (("decomposition", decomposition), ("unembed", unembed), ("restart", restart),
                     ("prefix_restart", prefix_restart), ("block_form", block_form), ("hook_z", hook_z)):
        measure(name, fn)
    conf.total_ms = (time.perf_counter() - t_all) * 1e3
    return conf


def _error_note(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def conformance_of(lm) -> Conformance:
    """The model's conformance results, computed now if the model was built without them."""
    if getattr(lm, "conformance", None) is None:
        lm.conformance = check_model(lm)
    return lm.conformance


def require(lm, *names: str, analysis: str) -> None:
    conformance_of(lm).require(*names, analysis=analysis)


def prefix_reuse_ok(lm) -> bool:
    """Whether sweeps may restart from a later position with recorded keys and values (else from position 0)."""
    return conformance_of(lm).ok("prefix_restart")


# the checks a patched hook kind depends on, beyond the restart itself
_COMPONENT_CHECKS = {
    "resid_pre": (), "resid_post": (), "attn_out": ("decomposition",), "mlp_out": ("decomposition",),
    "resid_mid": ("decomposition", "block_form"), "head_out": ("hook_z",), "attn.hook_z": ("hook_z",),
    "hook_embed": (), "ln_final.hook_normalized": ("unembed",),
}


def checks_for_component(component: str, restarts: bool = True) -> tuple[str, ...]:
    """The checks an analysis that patches `component` (and restarts mid-model if `restarts`) depends on."""
    extra = _COMPONENT_CHECKS.get(component, ("decomposition",))
    return (("restart", "unembed") if restarts else ()) + extra


def require_for_hook(lm, hook: str, analysis: str, restarts: bool = True) -> None:
    """Refuse `analysis` at a full hook point name if a check that hook depends on failed."""
    from desktop_app.engine.hooknames import parse_hook_name

    layer, kind = parse_hook_name(hook)
    require(lm, *checks_for_component(kind, restarts=restarts and layer is not None), analysis=analysis)


def check_loadable(lm) -> None:
    """The generic adapter (a family not known here) must pass every check but prefix reuse, or it is refused."""
    conf = conformance_of(lm)
    if lm.adapter.family != "generic":
        return
    bad = [c for c in conf.failed() if c.name != "prefix_restart"]
    if bad:
        from desktop_app.engine.errors import ModelLoadError
        raise ModelLoadError(
            f"{lm.info.model_type} is not a model family Interp Workbench knows, and its generic hook points failed "
            f"the conformance check '{bad[0].name}' ({bad[0].describe()}); it cannot be analysed.")
