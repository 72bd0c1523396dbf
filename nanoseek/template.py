"""What the chat template lets a reply write next, where the engine runs tools: in the thinking, text, a
calculator call or </think>; inside a call, text or the call's end; in the answer, text only. The end of
sentence is always allowed, and the tool's output tokens are the engine's to write. The engine masks every
other control token (its logit -inf) before it samples, so an answer never carries a stray call, a second
</think> or a role token; a prompt that does not end inside an assistant turn is not constrained.
"""

import torch

FREE, THINK, CALL, ANSWER = range(4)  # where a reply is: the rows of template_masks


def next_phase(phase, token, tokenizer):
    """Where a reply is after `token`, from `phase`."""
    if token == tokenizer.think_id:
        return THINK
    if token == tokenizer.end_think_id:
        return ANSWER if phase == THINK else phase
    if token == tokenizer.call_begin_id:
        return CALL if phase == THINK else phase
    if token == tokenizer.output_end_id:  # a call's output is written: back to the thinking
        return THINK if phase == CALL else phase
    if token in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.user_id, tokenizer.assistant_id):
        return FREE
    return phase


def phase_after(tokens, tokenizer, phase=FREE):
    for token in tokens:
        phase = next_phase(phase, token, tokenizer)
    return phase


def control_ids(tokenizer):
    """The control tokens a reply may be kept from writing: every special and tool token but the end of
    sentence."""
    return {tokenizer.bos_id, tokenizer.pad_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.think_id,
            tokenizer.end_think_id, *tokenizer.tool_ids.values()}


def template_masks(tokenizer, vocab, device=None):
    """(4, vocab) bool, True where a phase forbids the token."""
    control = control_ids(tokenizer)
    allowed = {FREE: control, THINK: {tokenizer.call_begin_id, tokenizer.end_think_id},
               CALL: {tokenizer.call_end_id}, ANSWER: set()}
    masks = torch.zeros(4, vocab, dtype=torch.bool, device=device)
    for phase, ok in allowed.items():
        masks[phase, sorted(control - ok)] = True
    return masks
