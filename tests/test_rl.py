"""GRPO: the loss and advantages by hand, a plug-in task and a JSONL task through rl and eval, and a
tiny seeded policy whose reward rises."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import torchrun

from nanoseek import checkpoint
from nanoseek.config import RLConfig
from nanoseek.evaluate import evaluate, pass_at_k, wilson
from nanoseek.rl import (
    GRPO,
    advantage_groups,
    group_advantages,
    grpo_loss,
    micro_batches,
    rl,
    score_group,
    steps_share,
    token_logprobs,
)
from nanoseek.rundir import read_metrics
from nanoseek.tasks import get_task

DIGITS_TASK = '''
from nanoseek.tasks import Problem, Reward

class Digits:
    """Rewards completions for being made of digits: easy to learn, so reward must rise."""
    name = "digits"

    def sample(self, rng, split, difficulty=None):
        return Problem(f"Count {rng.randint(0, 9)}", "0")

    def solve(self, problem):
        return "count", "0"

    def score(self, problem, completion):
        share = sum(c.isdigit() for c in completion) / max(1, len(completion))
        return Reward(share, 1.0, "share of digits")
'''

RANK_TASK = '''
import os

from nanoseek.tasks import Problem, Reward

class RankTask:
    """Rank 0 scores the share of digits, which varies; other ranks score every completion alike, so
    dynamic sampling keeps none of their groups."""
    name = "rank"

    def sample(self, rng, split, difficulty=None):
        return Problem(f"Count {rng.randint(0, 9)}", "0")

    def solve(self, problem):
        return "count", "0"

    def score(self, problem, completion):
        if os.environ["RANK"] != "0":
            return Reward(0.0, 0.0, "the same for every completion")
        return Reward(sum(c.isdigit() for c in completion) / max(1, len(completion)), 1.0, "share of digits")
'''


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(r, "mean"), expected)
    torch.testing.assert_close(group_advantages(r, "std"), expected / torch.tensor([[std + 1e-4], [1e-4]]))
    with pytest.raises(ValueError):
        group_advantages(r, "median")


def test_grpo_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    # ratios: row 0 = 1.5, 0.6, 1.1 (advantage +1); row 1 = 1.5, 0.6, 1.1 (advantage -1); last token masked out
    new = torch.log(torch.tensor([[0.75, 0.3, 0.55], [0.75, 0.3, 0.55]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # A > 0: min(r, clip(r)) -> 1.28 (clipped above), 0.6 (not clipped: the min keeps the lower value)
    # A < 0: min(-r, -clip(r)) -> -1.5, -0.8 (clipped below), -1.1
    per_token = [-1.28, -0.6, 1.5, 0.8, 1.1]
    assert float(loss) == pytest.approx(sum(per_token) / 5, rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(2 / 5) and stats["kl"] == 0.0
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]))
    loss_kl, stats_kl = grpo_loss(new, old, adv, mask, 0.2, 0.28, beta=0.1, ref_logp=ref)
    delta = ref - new
    k3 = torch.exp(delta) - delta - 1
    kl = float((k3 * mask).sum() / 5)
    assert stats_kl["kl"] == pytest.approx(kl, rel=1e-5)
    assert float(loss_kl) == pytest.approx(sum(per_token) / 5 + 0.1 * kl, rel=1e-5)


def test_pass_at_k_and_wilson():
    for n in (1, 7, 200, 500):  # the interval holds the estimate itself, also at 0 and n successes
        assert all(wilson(k, n)[0] <= k / n <= wilson(k, n)[1] for k in range(n + 1))
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0



def test_plugin_task_reward_rises(random_policy, tmp_path):
    task_file = tmp_path / "digits.py"
    task_file.write_text(DIGITS_TASK)
    out = tmp_path / "rl"
    rl({"init": random_policy, "task": f"{task_file}:Digits", "out": str(out), "steps": 12, "prompts": 4,
        "group": 8, "max_new_tokens": 8, "lr": 1e-2, "format_weight": 0.0, "progress": False, "device": "cpu",
        "ckpt_every": 0})
    rows = read_metrics(out / "metrics.jsonl")
    heldout = [(r["step"], r["heldout_digits"]) for r in rows if "heldout_digits" in r]
    assert [step for step, _ in heldout] == [0, 10, 12]  # before training, every eval_every steps, at the end
    assert all(0 <= accuracy <= 1 for _, accuracy in heldout)
    rows = [r for r in rows if r["step"] > 0]
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.1, [round(r["reward"], 3) for r in rows]
    assert {"entropy", "kl", "clip_frac", "groups_kept", "response_length"} <= set(rows[0])
    assert (out / "rl.png").exists() and (out / "final" / "model.safetensors").exists()
    results = evaluate([str(out / "final")], [f"{task_file}:Digits"], n=8, max_new_tokens=8, out=str(tmp_path / "ev"))
    assert results[str(out / "final")]["digits"]["all"]["n"] == 8
    assert (tmp_path / "ev" / "eval.md").read_text().startswith("pass@1")


def test_jsonl_task_through_rl_and_eval_with_kl_and_resume(random_policy, tmp_path):
    path = tmp_path / "squares.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} squared?", "answer": i * i}) for i in range(50)))
    opts = {"init": random_policy, "task": str(path), "checker": "numeric", "out": str(tmp_path / "rl"),
            "prompts": 2, "group": 4, "max_new_tokens": 6, "beta": 0.05, "mu": 2, "dynamic_sampling": False,
            "format_weight": 0.5, "lr": 1e-3, "warmup": 2, "progress": False, "device": "cpu", "ckpt_every": 1}
    rl({**opts, "steps": 2})
    last = rl({**opts, "steps": 3, "resume": True})
    rows = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and last["step"] == 3  # step 0: held-out accuracy only
    assert [r["lr"] for r in rows[1:]] == pytest.approx([5e-4, 1e-3, 1e-3])  # warmup, resumed at its step
    straight = rl({**opts, "steps": 3, "out": str(tmp_path / "straight")})
    assert straight["reward"] == last["reward"]  # seeded rollouts: resume replays the same problems
    assert checkpoint.load_config(tmp_path / "rl" / "final").trained_context_length == 96  # the parent's
    results = evaluate([random_policy, str(tmp_path / "rl" / "final")], [str(path)], n=5, k=2, max_new_tokens=6,
                       checker="numeric")
    assert len(results) == 2 and "pass@2" in results[random_policy]["squares"]["all"]


def test_bad_rl_options(random_policy, tmp_path):
    with pytest.raises(ValueError, match="unknown rl options"):
        rl({"init": random_policy, "out": str(tmp_path), "gamma": 1})
    with pytest.raises(ValueError, match="unknown task"):
        rl({"init": random_policy, "out": str(tmp_path), "task": "chess", "device": "cpu"})
    with pytest.raises(ValueError, match="temperature above 0"):
        rl({"init": random_policy, "out": str(tmp_path), "temperature": 0, "device": "cpu"})
    with pytest.raises(ValueError, match="rollouts per forward"):
        rl({"init": random_policy, "out": str(tmp_path), "micro_batch": -1, "device": "cpu"})


def test_logprobs_are_those_of_the_policy_at_the_rollout_temperature(random_policy):
    """The loss's log-probabilities are of the policy that sampled: at T = 1 the plain log-softmax, at T = 0.3
    the log-softmax of logits / 0.3, so two tokens' log-odds at one position grow by 1 / 0.3."""
    model = checkpoint.load(random_policy)[0].eval()
    ids, mask = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0)), torch.ones(2, 16)
    ids[1, :-1] = ids[0, :-1]  # the same prefix; the last tokens differ
    ids[1, -1] = (ids[0, -1] + 1) % 60 + 3
    with torch.no_grad():
        plain = torch.log_softmax(model(ids)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        at_1, _ = token_logprobs(model, ids, mask, 1.0)
        sharp, _ = token_logprobs(model, ids, mask, 0.3)
    assert torch.allclose(at_1, plain, atol=1e-5)
    odds_at_1, odds_sharp = at_1[0, -1] - at_1[1, -1], sharp[0, -1] - sharp[1, -1]
    assert abs(float(odds_at_1)) > 1e-3
    assert torch.allclose(odds_sharp, odds_at_1 / 0.3, rtol=1e-4)
    assert not torch.allclose(sharp, at_1)


def test_replay_keeps_training_worked_solutions(random_policy, tmp_path):
    """--replay adds the next-token loss of fresh worked solutions of another task to every GRPO step: that
    loss is logged and falls as the policy learns them, while the rollouts stay on the GRPO task."""
    task_file = tmp_path / "digits.py"
    task_file.write_text(DIGITS_TASK)
    rl({"init": random_policy, "task": f"{task_file}:Digits", "replay": "addition", "replay_rows": 8,
        "difficulty": 1, "out": str(tmp_path / "rl"), "steps": 8, "prompts": 2, "group": 4, "max_new_tokens": 4,
        "lr": 1e-2, "dynamic_sampling": False, "progress": False, "device": "cpu", "ckpt_every": 0})
    rows = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if r["step"] > 0]
    losses = [r["replay_loss"] for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(r["response_length"] <= 4 for r in rows)


def test_grpo_step_where_one_rank_keeps_no_group_finishes(random_policy, tmp_path):
    """Two gloo ranks under DDP; rank 1 drops every group, rank 0 keeps some: both still train each step."""
    (tmp_path / "rank_task.py").write_text(RANK_TASK)
    out = tmp_path / "rl"
    torchrun(["rl", "--init", random_policy, "--task", f"{tmp_path / 'rank_task.py'}:RankTask", "--out", str(out),
              "--steps", "2", "--prompts", "4", "--group", "4", "--max-new-tokens", "6", "--max-draws", "1",
              "--ckpt-every", "0", "--device", "cpu", "--no-progress"])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["groups_kept"] <= 2 for r in rows)  # rank 0 kept some, rank 1 none
    assert all(r["grad_norm"] > 0 for r in rows)
    assert (out / "final" / "model.safetensors").exists()


def test_process_reward_is_the_share_of_right_steps():
    countdown, addition = get_task("countdown"), get_task("addition")
    p = countdown.make(random.Random(2), 3)
    assert steps_share(countdown, p, "14+6=20,20-2=18\n14-6=8,8+2=11\n</think>\n\n14") == 0.75
    assert steps_share(countdown, p, "no steps\n</think>\n\n14") == 0.0
    assert steps_share(addition, addition.make(random.Random(2), 2), "1+1+0=02 2\n</think>\n\n2") == 0.0


def test_repeat_penalty_lowers_the_reward_of_a_completion_that_repeats_a_call():
    countdown = get_task("countdown")
    p = countdown.make(random.Random(2), 3)
    answer = f"a search\n</think>\n\n{countdown.solve(p)[1]}"  # right, whatever the reasoning
    begin, end = 1, 2
    once = SimpleNamespace(tokens=[1, 7, 8, 2, 9, 1, 7, 3, 2, 9], text=answer, finish_reason="stop")
    twice = SimpleNamespace(tokens=[1, 7, 8, 2, 9, 1, 7, 8, 2, 9], text=answer, finish_reason="stop")
    o = RLConfig(init="x", format_weight=0.0, repeat_penalty=0.4)
    group = score_group(o, countdown, p, [0], [once, twice], (begin, end))
    assert group.totals == [1.0, pytest.approx(0.6)] and group.repeats == [False, True]
    o = RLConfig(init="x", format_weight=0.0)
    assert score_group(o, countdown, p, [0], [once, twice], (begin, end)).totals == [1.0, 1.0]


def test_grpo_update_does_not_depend_on_the_micro_batch(random_policy, tmp_path):
    """The same rollouts updated with micro_batch 1, 4 and all (two passes, KL to the reference and the
    replay loss on) give the same statistics of the last pass and the same gradient (Adam's step, ~lr for any
    gradient, would blow float noise in gradients near 0 up to a sizeable part of lr)."""
    start = checkpoint.load(random_policy)[0].state_dict()
    kept, results = None, []
    for micro in (0, 1, 4):
        o = RLConfig(**{"init": random_policy, "out": str(tmp_path / f"rl{micro}"), "task": "addition",
                          "difficulty": 1, "replay": "addition", "replay_rows": 4, "prompts": 2, "group": 4,
                          "max_new_tokens": 12, "mu": 2, "beta": 0.1, "lr": 1e-2, "dynamic_sampling": False,
                          "micro_batch": micro, "device": "cpu", "progress": False})
        trainer = GRPO(o)
        if kept is None:  # the same rollouts for every micro-batch, with rewards that differ within groups
            kept = [g._replace(totals=[float(i % 3) for i in range(len(g.totals))]) for g in trainer.rollouts(0)[0]]
        grads, step, params = [], trainer.opt.step, list(trainer.model.parameters())
        trainer.opt.step = lambda grads=grads, step=step, params=params: grads.append(
            [p.grad.clone() for p in params if p.grad is not None]) or step()
        stats = trainer.update(kept, 0)
        moved = any(not torch.equal(w, start[k]) for k, w in trainer.model.state_dict().items())
        results.append((stats, grads[0], moved))
    (stats, grads, moved), rest = results[0], results[1:]
    assert stats["loss"] != 0.0 and stats["kl"] > 0.0 and stats["replay_loss"] > 0.0 and moved
    for other_stats, other_grads, _ in rest:
        assert other_stats == pytest.approx(stats, rel=1e-4, abs=1e-6)
        assert len(other_grads) == len(grads)
        for a, b in zip(other_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def one_row_each(groups):
    """Token ids (N, T), completion mask (N, T) and advantages (N,): each completion in a row of its own
    behind its prompt, padded on the right."""
    rows = [(prompt + tokens, [0] * len(prompt) + trained, a)
            for prompt, completions in groups for tokens, a, trained in completions]
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r, _, _ in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m, _ in rows]).float()
    return ids, mask, torch.tensor([a for _, _, a in rows])


def test_the_update_equals_one_row_per_completion(random_policy, tmp_path, monkeypatch):
    """The update packs each problem's completions behind one copy of its prompt and, without the KL term,
    leaves out completions of advantage 0 (a group whose rewards are all equal): its loss and gradient are
    those of every completion in a row of its own."""
    import nanoseek.rl

    o = RLConfig(**{"init": random_policy, "out": str(tmp_path / "rl"), "task": "addition", "difficulty": 1,
                      "prompts": 2, "group": 4, "max_new_tokens": 12, "beta": 0.0, "dynamic_sampling": False,
                      "device": "cpu", "progress": False})
    trainer = GRPO(o)
    first, second = trainer.rollouts(0)[0]
    kept = [first._replace(totals=[1.0, 0.0, 0.0, 1.0]), second._replace(totals=[1.0] * 4)]
    scored = []
    monkeypatch.setattr(nanoseek.rl, "token_logprobs", lambda net, ids, mask, *a, forward=token_logprobs:
                        scored.append(int(mask[:, 1:].sum())) or forward(net, ids, mask, *a))
    grads = []
    trainer.opt.step = lambda: grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                             for p in trainer.model.parameters()])
    stats = trainer.update(kept, 0)
    assert scored == [sum(len(s.tokens) for s in first.completions)]  # the second group never ran

    model = checkpoint.load(random_policy)[0].train()
    ids, mask, adv = one_row_each(advantage_groups(kept, o.advantage))
    logp, _ = token_logprobs(model, ids, mask)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask[:, 1:])
    loss.backward()
    loss = loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip or float("inf"))  # as the update does
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, p in zip(grads[0], model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad if p.grad is not None else torch.zeros_like(a), rtol=1e-4, atol=1e-6)


def test_a_packed_row_scores_each_completion_as_alone(random_policy):
    """Rows of one prompt and several completions give each completion's tokens the log-probabilities they have
    in a row of their own; a row holds at most per_row completions and one past PACKED_WIDTH tokens, and a
    micro-batch at most per_forward completions."""
    from nanoseek.rl import PACKED_WIDTH, pack, shared_prompt_rows

    model = checkpoint.load(random_policy)[0].eval()
    g = torch.Generator().manual_seed(2)
    groups = [([1, *torch.randint(3, 60, (n,), generator=g).tolist()],
               [(torch.randint(3, 60, (k,), generator=g).tolist(), 0.5, [1] * k) for k in lengths])
              for n, lengths in ((6, (3, 7, 1, 5)), (9, (4, 2)))]
    rows = shared_prompt_rows(groups)
    assert [r.completions for r in rows] == [4, 2] and len(rows[0].ids) == 6 + 4 + 8 + 2 + 6
    packed = pack(rows, "cpu")
    with torch.no_grad():
        logp, _ = token_logprobs(model, packed.ids, packed.mask, 1.0, packed.positions, packed.sees)
        ids, mask, _ = one_row_each(groups)
        alone, _ = token_logprobs(model, ids, mask)
    torch.testing.assert_close(logp[packed.mask[:, 1:].bool()], alone[mask[:, 1:].bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.advantages[packed.mask.bool()], torch.full((int(packed.mask.sum()),), 0.5))

    assert [r.completions for r in shared_prompt_rows(groups, per_row=3)] == [3, 1, 2]
    long = [([1, 2], [([5] * (PACKED_WIDTH // 2), 1.0, [1] * (PACKED_WIDTH // 2))] * 3)]
    assert [r.completions for r in shared_prompt_rows(long)] == [1, 1, 1]
    pieces = micro_batches(shared_prompt_rows(groups, per_row=3), 3)
    assert [[r.completions for r in piece] for piece in pieces] == [[3], [1, 2]]
    assert len(micro_batches(rows, 0)) == 1
    alone = pack(shared_prompt_rows(groups, per_row=1), "cpu")  # a prompt and a completion a row: plain causal
    assert alone.sees is None and alone.positions is None and torch.equal(alone.ids, ids)


def test_logprobs_in_chunks_equal_the_whole(random_policy, monkeypatch):
    """With logits made a few positions at a time (and again in the backward) the log-probabilities, the
    entropy and the gradient are those of the whole (N, T, vocab) at once."""
    import nanoseek.rl

    model = checkpoint.load(random_policy)[0].train()
    ids = torch.randint(3, 60, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(20) >= 8).float().expand(3, 20)
    results = []
    for elements in (None, 3 * 448 * 4):  # whole, then 4 positions per chunk
        if elements:
            monkeypatch.setattr(nanoseek.rl, "logit_chunk", lambda vocab, elements=elements: elements // vocab)
        model.zero_grad()
        logp, entropy = token_logprobs(model, ids, mask, 0.7)
        (logp * mask[:, 1:]).sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (logp, entropy, grads), (logp_c, entropy_c, grads_c) = results
    torch.testing.assert_close(logp_c, logp)
    torch.testing.assert_close(entropy_c, entropy)
    assert len(grads) == len(grads_c) > 0
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tokens_a_tool_wrote_are_out_of_the_loss(random_policy, tmp_path, monkeypatch):
    """A rollout's forced tokens (a tool's output) are context only: the update counts and scores only the sampled
    tokens, and log-probabilities at forced positions change neither the loss nor its gradient."""
    import nanoseek.rl
    from nanoseek.engine import Sequence
    from nanoseek.rl import Group
    from nanoseek.sampling import SamplingParams

    o = RLConfig(**{"init": random_policy, "out": str(tmp_path / "rl"), "task": "addition", "prompts": 1,
                      "group": 2, "beta": 0.1, "device": "cpu", "progress": False})
    trainer = GRPO(o)
    tok = trainer.tokenizer
    prompt = tok.render_chat([{"role": "user", "content": "What is 6 * 7?"}], add_generation_prompt=True)[0]
    output = [tok.output_begin_id, *tok.encode("42"), tok.output_end_id]
    call = [tok.call_begin_id, *tok.encode("6*7"), tok.call_end_id]
    after = tok.encode("so 42")
    tokens = [call + output + after, tok.encode("it is 41")]
    forced = [[False] * len(call) + [True] * len(output) + [False] * len(after), [False] * len(tokens[1])]
    seqs = [Sequence(i, prompt, SamplingParams(), 0, tokens=t, forced=f) for i, (t, f) in enumerate(zip(tokens,
                                                                                                          forced))]
    calls = []
    monkeypatch.setattr(nanoseek.rl, "grpo_loss", lambda *a: calls.append(a) or grpo_loss(*a))
    stats = trainer.update([Group(prompt, seqs, [None, None], [1.0, 0.0], [False, False])], 0)
    logp, old, advantages, mask, eps_low, eps_high, beta, ref, n_tokens = calls[0]
    sampled = sum(len(t) for t in tokens) - len(output)
    assert mask.sum() == n_tokens == sampled and math.isfinite(stats["entropy"]) and stats["kl"] >= 0
    at_forced = (advantages != 0) & (mask == 0)  # inside a completion, not scored
    assert int(at_forced.sum()) == len(output)

    logp = logp.detach().requires_grad_()
    loss, kl = grpo_loss(logp, old, advantages, mask, eps_low, eps_high, beta, ref, n_tokens)
    loss.backward()
    assert torch.all(logp.grad[at_forced] == 0) and torch.any(logp.grad[mask.bool()] != 0)
    moved, moved_kl = grpo_loss(logp.detach() + 5.0 * at_forced, old, advantages, mask, eps_low, eps_high, beta,
                                ref, n_tokens)
    assert moved == loss and moved_kl == kl
