"""Slow reference samplers written in the shape of the upstream code (ML-GSAI/LLaDA generate.py and
Dream's generation_utils.py ``_sample``), with an explicit generator in place of the global RNG.

They recompute every count from the current mask state instead of reading our Schedule, so they check
both the schedule and the sampling loops.
"""

import torch
import torch.nn.functional as F


def llada_reference(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id, g):
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo : lo + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
        for i in range(mask_num.size(0)):
            num_transfer_tokens[i, : (mask_num % steps)[i]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x], dim=0)), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            if temperature == 0:
                x0 = torch.argmax(logits, dim=-1)
            else:
                noise = torch.rand(logits.shape, dtype=torch.float64, generator=g)
                x0 = torch.argmax(logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=g)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


def _dream_sample_tokens(logits, temperature, margin_confidence, neg_entropy, g):
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_reference(model, prompt, max_new_tokens, steps, eps, alg, alg_temp, temperature, mask_id, g):
    x = F.pad(prompt, (0, max_new_tokens), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
            transfer_index_t_s = torch.rand(*x0.shape, generator=g) < p_transfer
            _, x0[transfer_index_t_s] = _dream_sample_tokens(
                mask_logits[transfer_index_t_s], temperature, False, False, g
            )
            x[mask_index] = x0.clone()
        else:
            confidence, x0 = _dream_sample_tokens(mask_logits, temperature, alg == "topk_margin", alg == "entropy", g)
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens, generator=g)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x
