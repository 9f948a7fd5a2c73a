"""Generation: the plain sampler (one HF `generate` per call) and the cached one, below the agent
loop.

The plain path is `generate_ids` (and `chat` on top of it): every call re-encodes its sequences.
The cached path is `CachedGenerator`, a drop-in `generate=` for `common.rollout.run_rollouts`
(same arguments and return as `generate_ids`); both draw from the same distribution
(`logit_warpers`) and stop on the same tokens (`eos_token_ids`, and stop strings by the same
transformers `StopStringCriteria`, which also fires when the last token runs past the
string). This module knows nothing of tools, turns or rewards: that is `common/rollout.py`,
which calls one of the two. Generation without doing work twice, exact against the plain path
(tests/test_generate.py, and on random cases tests/test_differential.py).

    from common.generate import CachedGenerator
    rollouts = run_rollouts(policy, examples, ..., generate=CachedGenerator())   # one per rollout
    batch

`CachedGenerator` is a drop-in `generate=` for `common.rollout.run_rollouts` (same arguments and
return as `common.rollout.generate_ids`). It keeps one batched KV cache for the rollout batch:
  * shared prefix: the G copies of a prompt (and its images) are prefilled once, and the cache
    rows are copied to the G samples, instead of G prefills (the vision tower runs once per
    distinct prompt image in generation);
  * across turns: on the next call it finds, for each sequence, the cache row whose tokens are
    its longest prefix and feeds only the rest (the last sampled token, the observation, a crop
    image), instead of re-encoding the prompt, its images and all earlier turns. Rows are
    matched by their tokens and the exact pixels of the images inside the shared prefix, so it
    is safe whatever the caller did between calls (a sequence that shares no usable prefix with
    any row is prefilled from scratch);
  * LoRA in decode: with a float32 base, the adapter is merged into copies of the base weights
    while generating (one matmul per projection instead of three) and the original weight
    tensors are put back afterwards, bit for bit; with a bf16 / fp16 base (where W + BA would
    be rounded) or NF4 the adapter stays separate.
Positions are computed, never inferred from model state: text tokens continue at (last position
+ 1), and an image in a fed segment gets Qwen2.5-VL's 3-D mrope positions from the model's own
`get_rope_index` on that segment, shifted (the rope index is shift-invariant). A cache is only
valid for the weights it was computed with: make a new CachedGenerator for every rollout batch.

`image_features` / `sub_batch` run the vision tower once per distinct image of a training batch
and hand its output to the reference and policy passes (`mm_encoder_outputs`), instead of
encoding every copy of a prompt image in each of those passes.

Size: over 500 lines because it holds two samplers that must agree token for token (the
plain path is the cached path's reference; tests/test_differential.py compares them)."""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch

from common.chat import Encoded, collate, encode, image_token_counts


# ---------------------------------------------------------------------------------------------
# batched generation
# ---------------------------------------------------------------------------------------------
def image_token_id(tokenizer) -> int | None:
    tid = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


# `sampling_config` pins the sampling flags (top_k=0, min_p=0 ...) even for greedy decoding, so
# a checkpoint's values never leak in; transformers then logs "The following generation flags are
# not valid and may be ignored: ['min_p', 'top_k']" for every greedy run. On purpose: drop it.
logging.getLogger("transformers.generation.configuration_utils").addFilter(
    lambda record: not str(record.msg).startswith("The following generation flags are not valid"))


def vision_token_ids(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                            "<|image_pad|>", "<|video_pad|>"])


def logit_warpers(temperature: float, top_k: int | None, top_p: float) -> list:
    """The sampler's distribution: softmax(logits / temperature), then top-k, then top-p (none
    when greedy). Shared by `generate_ids` and `common.fastgen`, so both sample the same."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    if temperature <= 0:
        return []
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def eos_token_ids(policy) -> list[int]:
    """The tokenizer's EOS plus the generation config's `eos_token_id` list, as TRL stops on
    (Qwen2.5-VL-Instruct: <|im_end|> and <|endoftext|>)."""
    ids = [policy.tokenizer.eos_token_id]
    cfg = getattr(getattr(policy, "model", None), "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    for i in ([extra] if isinstance(extra, int) else list(extra or [])):
        if i not in ids:
            ids.append(int(i))
    return ids


def sampling_config(policy, *, max_new_tokens: int, temperature: float, top_p: float,
                    top_k: int | None, min_new_tokens: int = 0):
    """A GenerationConfig with every setting that changes the distribution pinned: whatever
    the checkpoint's generation_config says (repetition_penalty, min_new_tokens, bad words,
    top_k=20 ...) does not leak in, so the sampler draws from softmax(logits / temperature)
    (then top-k / top-p when asked), which is what the training pass scores. Temperature, top-k
    and top-p are applied by our own processors (`_SamplerLogps` sees their output)."""
    from transformers import GenerationConfig
    tok = policy.tokenizer
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=temperature > 0,
        temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, top_h=None, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0,
        bad_words_ids=None, sequence_bias=None, renormalize_logits=False, guidance_scale=1.0,
        num_beams=1, num_beam_groups=1, num_return_sequences=1, forced_bos_token_id=None,
        forced_eos_token_id=None, suppress_tokens=vision_token_ids(tok) if policy.is_vlm else None,
        begin_suppress_tokens=None, use_cache=True, pad_token_id=tok.pad_token_id,
        eos_token_id=eos_token_ids(policy), disable_compile=True)


class _RowStop:
    """Stopping criterion: row b stops at its own budget, an EOS, or a stop string; records
    each row's length at the first stop (so padding after it is never mistaken for output)."""

    def __init__(self, prompt_len, budgets, eos, stop_criteria):
        self.prompt_len, self.budgets, self.stop = prompt_len, budgets, stop_criteria
        self.eos = eos
        self.lengths = [None] * len(budgets.tolist())

    def __call__(self, input_ids, scores, **kw):
        n = input_ids.shape[1] - self.prompt_len
        done = (n >= self.budgets) | torch.isin(input_ids[:, -1], self.eos)
        if self.stop is not None:
            done = done | self.stop(input_ids, scores)
        for b in done.nonzero().flatten().tolist():
            if self.lengths[b] is None:
                self.lengths[b] = n
        return done


class _SamplerLogps:
    """The last logits processor: keeps log softmax of the final (processed) scores, i.e. the
    distribution the token is drawn from, and reads off the chosen token's log-prob one step
    later. One (b, V) tensor alive at a time."""

    def __init__(self):
        self.prev, self.logps = None, []

    def take(self, chosen):
        if self.prev is not None:
            self.logps.append(self.prev.gather(-1, chosen[:, None]).squeeze(-1))  # (b,)

    def __call__(self, input_ids, scores):
        self.take(input_ids[:, -1])
        self.prev = scores.float().log_softmax(-1)                           # (b, V)
        return scores


@torch.no_grad()
def generate_ids(policy, seqs: list[Encoded], *, max_new_tokens: int | list[int],
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 stop_strings: list[str] | None = None, batch_size: int = 64,
                 return_logprobs: bool = False, min_new_tokens: int | None = None):
    """Left-padded batched `generate` (KV cache on); returns each row's new ids, ending at the
    first EOS (full list: `eos_token_ids`), stop string or that row's own budget.

    max_new_tokens: one budget for all rows, or one per row.
    return_logprobs: also return, per row, the sampler's log-prob of each token (the
    distribution after temperature / top-k / top-p), to compare with the training pass.
    min_new_tokens: EOS suppressed before this many tokens (benchmarks that need equal work;
    it changes the distribution, which the sampler log-probs then show). Every other sampling
    setting is pinned (`sampling_config`)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList, StopStringCriteria
    tok, model = policy.tokenizer, policy.model
    budgets_all = ([int(max_new_tokens)] * len(seqs) if isinstance(max_new_tokens, int)
                   else [int(b) for b in max_new_tokens])
    if len(budgets_all) != len(seqs) or min(budgets_all, default=1) < 1:
        raise ValueError("generate_ids: give one budget >= 1 per sequence.")
    eos = eos_token_ids(policy)
    stop_crit = StopStringCriteria(tok, stop_strings) if stop_strings else None
    was_training = model.training
    model.eval()  # no dropout, no gradient checkpointing while sampling
    out, out_lp = [], []
    try:
        for i in range(0, len(seqs), batch_size):
            chunk, budgets = seqs[i: i + batch_size], budgets_all[i: i + batch_size]
            batch = collate(chunk, tok.pad_token_id, "left", image_token_id(tok))
            batch.pop("loss_mask")
            batch = {k: v.to(policy.device) for k, v in batch.items()}
            P = batch["input_ids"].shape[1]
            rows = _RowStop(P, torch.tensor(budgets, device=policy.device),
                            torch.tensor(eos, device=policy.device), stop_crit)
            rec = _SamplerLogps()
            procs = logit_warpers(temperature, top_k, top_p)
            if temperature > 0 and return_logprobs:
                procs.append(rec)
            gcfg = sampling_config(policy, max_new_tokens=max(budgets), temperature=temperature,
                                   top_p=top_p, top_k=top_k,
                                   min_new_tokens=int(min_new_tokens or 0))
            gen = model.generate(**batch, generation_config=gcfg,
                                 logits_processor=LogitsProcessorList(procs),
                                 stopping_criteria=StoppingCriteriaList([rows]))[:, P:]  # (b, new)
            if temperature > 0 and return_logprobs:
                rec.take(gen[:, -1])
                lp = torch.stack(rec.logps,
                                 1) if rec.logps else gen.new_zeros(len(chunk), 0).float()
            for b, row in enumerate(gen.tolist()):
                n = rows.lengths[b] if rows.lengths[b] is not None else len(row)
                out.append(row[:n])
                out_lp.append(lp[b, :n].tolist() if temperature > 0 and return_logprobs else None)
    finally:
        model.train(was_training)
    return (out, out_lp) if return_logprobs else out


def chat(policy, batch: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
         **kw) -> list[str]:
    """Reply to a batch of conversations (messages as in common/chat.py); strings out."""
    seqs = [encode(policy.tokenizer, policy.image_processor, m, add_generation_prompt=True)
            for m in batch]
    ids = generate_ids(policy, seqs, max_new_tokens=max_new_tokens, temperature=temperature, **kw)
    return [policy.tokenizer.decode(r, skip_special_tokens=True) for r in ids]


# ---------------------------------------------------------------------------------------------
# the cached generator
# ---------------------------------------------------------------------------------------------


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _suppressed(policy) -> list[int]:
    if not policy.is_vlm:
        return []
    return policy.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>",
                                                   "<|vision_pad|>",
                                                   "<|image_pad|>", "<|video_pad|>"])


# ---------------------------------------------------------------------------------------------
# LoRA merged into the weights while decoding (float32 base only)
# ---------------------------------------------------------------------------------------------
def can_merge(policy) -> bool:
    """Merge LoRA into the base only when every adapted base weight is float32. In bf16 / fp16,
    W + scale * B A is rounded to the base dtype and a young adapter (lora_B ~ 1e-4) is mostly
    lost (the merged delta was 62 % off), so the sampler would not be the policy being trained;
    there (and with NF4) the adapter stays separate while decoding."""
    if not policy.has_adapter or policy.extra.get("load_in_4bit"):
        return False
    from peft.tuners.lora import LoraLayer
    dtypes = {m.get_base_layer().weight.dtype for m in policy.model.modules()
              if isinstance(m, LoraLayer)}
    return dtypes == {torch.float32}


@contextlib.contextmanager
def merged_lora(policy):
    """Decode with W + scale * B A in place of W (the adapter off), then put the original weight
    tensors back (the same objects: no rounding drift). No-op unless `can_merge`."""
    if not can_merge(policy):
        yield
        return
    from peft.tuners.lora import LoraLayer
    saved = []
    try:
        with torch.no_grad():
            for m in policy.model.modules():
                if isinstance(m, LoraLayer) and not getattr(m, "disable_adapters", False):
                    base = m.get_base_layer()
                    delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
                    if isinstance(delta, torch.Tensor):
                        saved.append((base.weight, base.weight.data))
                        base.weight.data = base.weight.data + delta.to(base.weight.dtype)
        with policy.model.disable_adapter():
            yield
    finally:
        for p, data in saved:
            p.data = data


# ---------------------------------------------------------------------------------------------
# the cached generator
# ---------------------------------------------------------------------------------------------
def _draw(logp: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax = exp(logp) (R, V), by inverse CDF: a uniform per row
    and a binary search in the float64 cumulative sum. The same distribution as
    torch.multinomial, which on a CPU draws V exponentials per row (6 % of SmolLM2's decode)."""
    cdf = logp.double().exp().cumsum(-1)                                  # (R, V)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


class _Row:
    """What one cache row holds: its tokens in order, the cache slot of each, the text position
    after each (so a row can be cut back to any prefix), and the images it has seen, in order,
    as (pixel_values, grid) per image (so a prefix is reused only with the very same pixels)."""

    __slots__ = ("tokens", "slots", "after", "images")

    def __init__(self):
        self.tokens, self.slots, self.after, self.images = [], [], [], []

    @property
    def next_pos(self) -> int:
        return self.after[-1] if self.after else 0

    @property
    def n_images(self) -> int:
        return len(self.images)

    def copy(self):
        r = _Row()
        r.tokens, r.slots, r.after = list(self.tokens), list(self.slots), list(self.after)
        r.images = list(self.images)
        return r

    def cut(self, k: int, n_images: int) -> None:
        self.tokens, self.slots, self.after = self.tokens[:k], self.slots[:k], self.after[:k]
        self.images = self.images[:n_images]


def _split_images(s: Encoded) -> list:
    """[(pixel_values, grid (1, 3))] per image of s, in order."""
    if s.image_grid_thw is None or len(s.image_grid_thw) == 0:
        return []
    sizes = [int(g.prod()) for g in s.image_grid_thw]
    return list(zip(s.pixel_values.split(sizes), s.image_grid_thw.split(1)))


def _same_pixels(a: Encoded, b: Encoded) -> bool:
    if a.pixel_values is None or b.pixel_values is None:
        return a.pixel_values is None and b.pixel_values is None
    return a.pixel_values is b.pixel_values or torch.equal(a.pixel_values, b.pixel_values)


def _same_image(a, b, memo: dict) -> bool:
    """Exactly the same pixels and grid (torch.equal), memoised on the tensors' identity."""
    key = (id(a[0]), id(b[0]), id(a[1]), id(b[1]))
    if key not in memo:
        memo[key] = (a, b, a[0] is b[0] and a[1] is b[1]
                     or (torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])))
    return memo[key][2]


class CachedGenerator:
    """`generate=` for run_rollouts with a KV cache shared by the G samples and kept across turns.

    force_length: suppress end-of-turn until each row's budget (the bench's forced-length work).
    merge_lora: merge the adapter into the weights while decoding (float32 base only).
    stats: tokens prefilled / reused from the cache, decode steps (for the bench)."""

    def __init__(self, force_length: bool = False, merge_lora: bool = True):
        self.force_length, self.merge_lora = force_length, merge_lora
        self._params, self._stops = None, {}
        self.cache, self.attn, self.rows = None, None, []
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "decode_steps": 0, "calls": 0}

    # -- model plumbing ------------------------------------------------------------------------
    def _forward(self, policy, ids, attn, pos, pixel_values=None, grid=None):
        hf = _unwrap(policy.model)
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        if self._params is None:   # read once: inspect.signature on every decode step costs
            self._params = inspect.signature(hf.forward).parameters
        params = self._params
        kw["cache" if "cache" in params else "past_key_values"] = self.cache
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = 1
        if pixel_values is not None:
            kw.update(pixel_values=pixel_values, image_grid_thw=grid)
        out = hf(**kw)
        # transformers 5 names it `cache` (reading `past_key_values` logs a deprecation warning)
        self.cache = getattr(out, "cache", None)
        if self.cache is None:
            self.cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1].float()                                  # (R, V)

    def _segment_positions(self, policy, ids: list[int], grids, start: int):
        """Positions of a segment that starts at text position `start`: (3, n) for a VLM (mrope,
        from the model's get_rope_index when the segment holds images), (n,) otherwise; and the
        text position after each token."""
        n = len(ids)
        img = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>") if policy.is_vlm else None
        if grids is None or img not in ids:
            p = torch.arange(start, start + n)
            return (p.view(1, -1).expand(3, -1) if policy.is_vlm
                    else p), list(range(start + 1, start + n + 1))
        t = torch.tensor([ids])
        pos, _ = _unwrap(policy.model).model.get_rope_index(t, (t == img).int(),
                                                            image_grid_thw=grids)
        pos = pos[:, 0].cpu() + start                                     # (3, n)
        return pos, (pos.max(0).values.cummax(0).values + 1).tolist()

    # -- matching the new sequences to cache rows --------------------------------------------------
    def _match(self, policy, seqs: list[Encoded]):
        """For each sequence: (row, k tokens shared, images inside them) for the row holding its
        longest usable prefix, or None. A prefix is usable when its tokens are the row's and the
        images inside it are whole and exactly the row's (pixels and grid: two prompts with the
        same text and same-size different images share tokens, not a cache); a token match that
        cuts into an image, or reaches an image that differs, is cut back to before it."""
        img = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>") if policy.is_vlm else None
        memo, out = {}, []
        for s in seqs:
            counts, images = image_token_counts(s.image_grid_thw), _split_images(s)
            pads = [i for i, t in enumerate(s.input_ids) if t == img] if counts else []
            starts = [pads[sum(counts[:j])] for j in range(len(counts))]       # first pad of each
            ends = [pads[sum(counts[: j + 1]) - 1] + 1 for j in range(len(counts))]
            best = None
            for j, row in enumerate(self.rows):
                k, n = 0, min(len(row.tokens), len(s.input_ids) - 1)   # always feed >= 1 token
                while k < n and row.tokens[k] == s.input_ids[k]:
                    k += 1
                if best is not None and k <= best[1]:
                    continue
                n_img = 0
                for a, b, im in zip(starts, ends, images):
                    if a >= k:
                        break
                    if (b > k or n_img >= len(row.images)
                            or not _same_image(row.images[n_img], im, memo)):
                        k = a                                   # cut back to before this image
                        break
                    n_img += 1
                if k > 0 and (best is None or k > best[1]):
                    best = (j, k, n_img)
            out.append(best)
        return out

    def _images_of(self, s: Encoded, first: int):
        """pixel_values / grids of the images of s from index `first` on (None when none)."""
        if s.image_grid_thw is None or first >= len(s.image_grid_thw):
            return None, None
        sizes = [int(g.prod()) for g in s.image_grid_thw]
        return s.pixel_values[sum(sizes[:first]):], s.image_grid_thw[first:]

    # -- prefill / extend ------------------------------------------------------------------------
    def _feed(self, policy, seqs, matches):
        """Bring the cache to one row per sequence holding all its tokens; return the logits after
        the last one (R, V)."""
        dev = policy.device
        if self.cache is None or any(m is None for m in matches):
            # the G copies of a prompt are prefilled once: the same tokens and exactly the same
            # images (torch.equal; a rotated image has the same shape and pixel sum)
            groups, index, firsts = {}, [], []
            for i, s in enumerate(seqs):
                grid = (None if s.image_grid_thw is None
                        else tuple(s.image_grid_thw.flatten().tolist()))
                same = groups.setdefault((tuple(s.input_ids), grid), [])
                u = next((u for u in same if _same_pixels(seqs[firsts[u]], s)), None)
                if u is None:
                    u = len(firsts)
                    same.append(u)
                    firsts.append(i)
                index.append(u)
            self.cache, self.rows = None, [_Row() for _ in firsts]
            self.attn = torch.zeros(len(firsts), 0, dtype=torch.long, device=dev)
            logits = self._extend(policy, [seqs[i] for i in firsts], [0] * len(firsts))
            sel = torch.tensor(index, device=dev)
            self._select(sel)
            return logits[sel]
        self._select(torch.tensor([m[0] for m in matches], device=dev))
        self.stats["reused_tokens"] += sum(m[1] for m in matches)
        for i, (r, (_, k, n_img)) in enumerate(zip(self.rows, matches)):   # drop what is not shared
            if k < len(r.tokens):
                self.attn[i, r.slots[k]:] = 0
            r.cut(k, n_img)
        return self._extend(policy, seqs, [m[1] for m in matches])

    def _select(self, sel):
        self.cache.batch_select_indices(sel)
        self.attn = self.attn[sel]
        self.rows = [self.rows[j].copy() for j in sel.tolist()]

    def _extend(self, policy, seqs, have: list[int]):
        """Feed seqs[i].input_ids[have[i]:] into row i (left-padded segments); logits (R, V)."""
        dev = policy.device
        segs = [s.input_ids[h:] for s, h in zip(seqs, have)]
        S, R = max(len(x) for x in segs), len(seqs)
        ids = torch.full((R, S), policy.tokenizer.pad_token_id, dtype=torch.long)
        seg_attn = torch.zeros(R, S, dtype=torch.long)
        pos = torch.zeros((3, R, S) if policy.is_vlm else (R, S), dtype=torch.long)
        pvs, grids = [], []
        L0 = self.attn.shape[1]
        for i, (s, seg, row) in enumerate(zip(seqs, segs, self.rows)):
            n = len(seg)
            ids[i, S - n:] = torch.tensor(seg)
            seg_attn[i, S - n:] = 1
            pv, grid = self._images_of(s, row.n_images)
            p, after = self._segment_positions(policy, seg, grid, row.next_pos)
            if policy.is_vlm:
                pos[:, i, S - n:] = p
            else:
                pos[i, S - n:] = p
            if pv is not None:
                pvs.append(pv)
                grids.append(grid)
            row.tokens += seg
            row.slots += list(range(L0 + S - n, L0 + S))
            row.after += after
            row.images = _split_images(s)
        self.attn = torch.cat([self.attn, seg_attn.to(dev)], 1)
        self.stats["prefill_tokens"] += int(seg_attn.sum())
        pv = torch.cat(pvs).to(dev) if pvs else None
        grid = torch.cat(grids).to(dev) if grids else None
        return self._forward(policy, ids.to(dev), self.attn, pos.to(dev), pv, grid)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, policy, seqs: list[Encoded], *, max_new_tokens, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int | None = None,
                 stop_strings: list[str] | None = None,
                 batch_size: int = 64, return_logprobs: bool = False,
                 min_new_tokens: int | None = None):
        tok, dev = policy.tokenizer, policy.device
        R = len(seqs)
        budgets = [int(max_new_tokens)] * R if isinstance(max_new_tokens,
                                                          int) else [int(b) for b in max_new_tokens]
        mins = budgets if self.force_length else [int(min_new_tokens or 0)] * R
        eos = torch.tensor(eos_token_ids(policy), device=dev)
        eos_ids = set(eos.tolist())
        warpers = logit_warpers(temperature, top_k, top_p)
        suppress = _suppressed(policy)
        stop = self._stop_criteria(tok, stop_strings) if stop_strings else None
        was_training = policy.model.training
        policy.model.eval()
        self.stats["calls"] += 1
        out = [[] for _ in range(R)]
        lps = [[] for _ in range(R)]
        # log_softmax of the model's logits (no processors)
        self.raw_logps = [[] for _ in range(R)]
        try:
            with (merged_lora(policy) if self.merge_lora else contextlib.nullcontext()):
                matches = self._match(policy, seqs) if self.cache is not None else [None] * R
                logits = self._feed(policy, seqs, matches)                      # (R, V)
                done = [False] * R
                for t in range(max(budgets)):
                    scores = logits.clone()
                    if suppress:
                        scores[:, suppress] = float("-inf")
                    for i in range(R):
                        if len(out[i]) < mins[i]:
                            scores[i, eos] = float("-inf")
                    for w in warpers:
                        scores = w(None, scores)
                    logp_all = scores.log_softmax(-1)
                    nxt = _draw(logp_all) if temperature > 0 else scores.argmax(-1)  # (R,)
                    chosen = logp_all.gather(-1, nxt[:, None])[:, 0].tolist()
                    raw = logits.log_softmax(-1).gather(-1, nxt[:, None])[:, 0].tolist()
                    fed = []
                    for i, tkn in enumerate(nxt.tolist()):
                        fed.append(not done[i])
                        if done[i]:
                            continue
                        out[i].append(tkn)
                        lps[i].append(chosen[i])
                        self.raw_logps[i].append(raw[i])
                        if tkn in eos_ids or len(out[i]) >= budgets[i]:
                            done[i] = True
                    if stop is not None:
                        self._stop_on_strings(stop, seqs, out, fed, done, tok.pad_token_id)
                    if all(done):
                        break
                    self.stats["decode_steps"] += 1
                    logits = self._step(policy, nxt, fed)
        finally:
            policy.model.train(was_training)
        if temperature <= 0:   # as generate_ids: no sampler log-probs for greedy decoding
            lps = [None] * R
        return (out, lps) if return_logprobs else out

    def _stop_criteria(self, tok, stop_strings):
        """The plain path's stop-string test (transformers' StopStringCriteria), made once per
        generator and set of strings (building it reads the whole vocabulary)."""
        from transformers import StopStringCriteria
        key = (id(tok), tuple(stop_strings))
        if key not in self._stops:
            self._stops[key] = StopStringCriteria(tok, list(stop_strings))
        return self._stops[key]

    @staticmethod
    def _stop_on_strings(stop, seqs, out, fed, done, pad_id):
        """Mark done the rows that just fed a token completing a stop string, by the plain
        path's own criterion on the same window: the last `maximum_token_len` tokens of the
        whole sequence (prompt and earlier turns included), so a final token that runs past
        the end of the stop string (SmolLM2's `</` `answer` `>.`) stops here too. A sequence
        shorter than the window is left-padded with pad ids (the plain path pads to its batch's
        longest prompt instead: the two differ only if a stop string reaches across a whole
        prompt into its padding)."""
        W = stop.maximum_token_len
        rows = [i for i, f in enumerate(fed) if f and not done[i]]
        if not rows:
            return
        tails = []
        for i in rows:
            tail = out[i][-W:]
            if len(tail) < W:
                tail = seqs[i].input_ids[len(tail) - W:] + tail
            tails.append([pad_id] * (W - len(tail)) + tail)
        hit = stop(torch.tensor(tails), None).tolist()
        for i, h in zip(rows, hit):
            done[i] = done[i] or bool(h)

    def _step(self, policy, nxt, fed):
        """Feed one token per row (rows already finished feed a masked pad)."""
        dev = policy.device
        R = len(fed)
        ids = torch.where(torch.tensor(fed, device=dev), nxt,
                          torch.full_like(nxt, policy.tokenizer.pad_token_id))
        col = torch.tensor(fed, dtype=torch.long, device=dev)[:, None]
        L0 = self.attn.shape[1]
        self.attn = torch.cat([self.attn, col], 1)
        p = torch.tensor([r.next_pos for r in self.rows], dtype=torch.long)
        for i, r in enumerate(self.rows):
            if fed[i]:
                r.tokens.append(int(ids[i]))
                r.slots.append(L0)
                r.after.append(r.next_pos + 1)
        pos = p.view(1, R, 1).expand(3, R, 1) if policy.is_vlm else p.view(R, 1)
        return self._forward(policy, ids[:, None], self.attn, pos.to(dev))


# ---------------------------------------------------------------------------------------------
# the vision tower once per distinct image of a training batch
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def image_features(model, batch: dict):
    """Per-image vision features of a rollout batch (`common.rollout.rollout_batch`), the tower
    run once per distinct image (the G copies of a prompt image are one): a list, one (n_tokens,
    H) tensor per image in batch order, or None without images."""
    if "pixel_values" not in batch or len(batch["pixel_values"]) == 0:
        return None
    hf = _unwrap(model)
    grid, pv = batch["image_grid_thw"], batch["pixel_values"]
    sizes = grid.prod(-1).tolist()
    chunks = list(pv.split(sizes))
    uniq, index = {}, []
    for c, g in zip(chunks, grid.tolist()):
        key = (tuple(g), c.shape[0], float(c.double().sum()), float((c.double() ** 2).sum()))
        if key in uniq and not torch.equal(chunks[uniq[key][0]], c):
            key = key + (len(uniq),)
        uniq.setdefault(key, (len(index), len(uniq)))
        index.append(uniq[key][1])
    firsts = sorted(set(v[0] for v in uniq.values()))
    feats = hf.model.get_image_features(torch.cat([chunks[i] for i in firsts]), grid[firsts],
                                        return_dict=True)
    per = list(feats.pooler_output)
    return [per[u] for u in index]


def sub_batch(batch: dict, rows: list[int], feats) -> dict:
    """Rows of a rollout batch for a forward pass, with the images' precomputed vision features
    (`mm_encoder_outputs`) in place of pixel_values when `feats` is given."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    out = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" not in batch:
        return out
    first = torch.cat([batch["n_images"].new_zeros(1), batch["n_images"].cumsum(0)])  # (B+1,)
    img = [i for b in rows for i in range(int(first[b]), int(first[b + 1]))]
    out["image_grid_thw"] = batch["image_grid_thw"][img]
    if feats is not None and not img:   # rows without images: a text-only forward
        return {k: v for k, v in out.items() if k not in ("image_grid_thw", "mm_token_type_ids")}
    if feats is not None:
        pooled = tuple(feats[i] for i in img)
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        return out
    patches = batch["image_grid_thw"].prod(-1)
    pfirst = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
    out["pixel_values"] = torch.cat([batch["pixel_values"][pfirst[i]: pfirst[i + 1]]
                                     for i in img]) \
        if img else batch["pixel_values"][:0]
    return out
