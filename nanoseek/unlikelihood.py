"""Unlikelihood on repeated calculator calls (Welleck et al., 2019, "Neural text generation with unlikelihood
training"): where a worked solution's calculator call departs from an earlier call of the same document, the
token the earlier call had there is pushed down, -log(1 - p), beside the cross-entropy that pulls the written
token up. A search trace never repeats an attempt, but a model trained by cross-entropy alone learns that
only through the mass it gives the attempt written; greedily decoded, it writes its likeliest attempt again
and again (docs/SPEEDRUN.md). The calls are read from the token ids, so every task whose traces call the
calculator gets it and no data format changes.
"""

import torch
import torch.nn.functional as F


def first_difference(a, b):
    """The first index where two calls' tokens differ, None when they are equal: each ends with the call's end
    token and holds no other, so two different calls differ within the shorter one."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def calls(ids, begin_id, end_id):
    """(start, end) of each calculator call in ids that ends: ids[start] its begin token, ids[end] its end token,
    no other begin between them."""
    for i in (i for i, t in enumerate(ids) if t == begin_id):
        end = next((j for j in range(i + 1, len(ids)) if ids[j] in (end_id, begin_id)), None)
        if end is not None and ids[end] == end_id:
            yield i, end


def repeated_call_negatives(x, targets, document_ids, begin_id, end_id):
    """(B, T) long, -100 but at the trained positions where a calculator call departs from an earlier call of its
    document: there, the earlier call's token, what writing that call again would put next. x (B, T) input
    ids; targets (B, T) next tokens, -100 where not trained; document_ids (B, T) or None."""
    negatives = torch.full_like(targets, -100)
    rows, trained = x.tolist(), (targets != -100).tolist()
    docs = document_ids.tolist() if document_ids is not None else [[0] * x.shape[1]] * x.shape[0]
    for b, (ids, doc) in enumerate(zip(rows, docs)):
        earlier = {}  # document -> its calls so far, each its tokens through its end token
        for i, end in calls(ids, begin_id, end_id):
            if doc[end] != doc[i]:
                continue  # a call its document cuts
            call = ids[i + 1 : end + 1]
            for before in earlier.setdefault(doc[i], []):
                k = first_difference(before, call)
                if k is not None and trained[b][i + k]:
                    negatives[b, i + k] = before[k]  # position i + k predicts call[k]
            earlier[doc[i]].append(call)
    return negatives


def repeats_a_call(ids, begin_id, end_id):
    """Whether a completion's token ids hold a calculator call, begin to end, equal to an earlier one."""
    seen = set()
    for i, end in calls(ids, begin_id, end_id):
        if tuple(ids[i + 1 : end]) in seen:
            return True
        seen.add(tuple(ids[i + 1 : end]))
    return False


def unlikelihood_loss(h, head_weight, negatives, targets):
    """Sum of -log(1 - p(negative)) over the positions with a negative, divided by the trained targets: on the
    scale of the mean cross-entropy. h (B, T, D) final hidden states; head_weight (vocab, D)."""
    picked = negatives.flatten() != -100
    if not bool(picked.any()):
        return h.sum() * 0.0
    logits = F.linear(h.flatten(0, 1)[picked], head_weight).float()
    p = logits.softmax(-1).gather(1, negatives.flatten()[picked][:, None]).squeeze(1)
    return -torch.log1p(-p.clamp(max=1 - 1e-6)).sum() / (targets != -100).sum().clamp(min=1)
