"""Host-side bookkeeping of the paged KV cache: which fixed-size pages each decode slot holds.

The device holds `num_pages` pages of `tokens_per_page` tokens per layer; a slot's page table row lists its pages in
token order. Page 0 is never handed out: unused table entries (and empty slots, which still step with the batch)
point at it, so their writes land in a scratch page no sequence reads unmasked.

Pages are taken as a sequence grows (`ensure`) and returned when it ends (`release`). `reserve` books the pages a
request may still need so admission can refuse a request up front instead of running out mid-decode.

Prefix caching (`prefix_caching=True`): the full pages of a prefilled prompt are registered (`register`) under their
block of tokens and the block before it, so a later prompt starting with the same tokens finds them (`match`) and
puts them in its own table row (`share`) instead of computing them again. A shared page is reference-counted; when
no slot holds it, it stays cached, least recently used first to be evicted when a page is needed. Only pages wholly
inside a prompt are registered, and a sequence only ever writes past its prompt, so shared pages are never written
(except by an insert rewriting them with the same contents).
"""

import collections
from typing import Sequence

import numpy as np

NULL_PAGE = 0


class PageManager:
  """Free list, page table [num_slots, max_pages_per_slot] and per-slot reservations."""

  def __init__(self, num_pages: int, tokens_per_page: int, max_pages_per_slot: int, num_slots: int):
    if num_pages < 2:
      raise ValueError(f"pagedattn_num_pages: {num_pages} pages leave none to allocate (page 0 is scratch)")
    self.num_pages = num_pages
    self.tokens_per_page = tokens_per_page
    self.max_pages_per_slot = max_pages_per_slot
    self.table = np.full((num_slots, max_pages_per_slot), NULL_PAGE, np.int32)
    self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: low ids first
    self._held = [0] * num_slots  # pages in each slot's table row
    self._reserved = [0] * num_slots  # pages each slot may still take (booked, not yet held)
    self.version = 0  # bumped on every table change, so the device copy is refreshed only when needed
    # Prefix caching: block id of (previous block id, block tokens); page of each block id and back; slots holding
    # each cached page; cached pages no slot holds, least recently used first.
    self._block_ids: dict[tuple[int, tuple[int, ...]], int] = {}
    self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
    self._next_block = 0  # ids are never reused: a block orphaned by its parent's eviction stays unreachable
    self._page_of: dict[int, int] = {}
    self._block_of: dict[int, int] = {}
    self._refs: collections.Counter = collections.Counter()
    self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.hit_tokens = 0  # prompt tokens served from cached pages (a metric)

  @property
  def capacity(self) -> int:
    """Pages that can ever be allocated (page 0 excluded)."""
    return self.num_pages - 1

  @property
  def used(self) -> int:
    """Pages some slot holds (cached pages no slot holds are reusable, so not counted)."""
    return self.capacity - len(self._free) - len(self._idle)

  @property
  def cached(self) -> int:
    """Pages holding registered prompt blocks (held by slots or idle)."""
    return len(self._page_of)

  @property
  def available(self) -> int:
    """Free or evictable pages not booked by a reservation."""
    return len(self._free) + len(self._idle) - sum(self._reserved)

  def pages_for(self, tokens: int) -> int:
    return -(-tokens // self.tokens_per_page)

  def can_reserve(self, tokens: int) -> bool:
    return self.pages_for(tokens) <= min(self.available, self.max_pages_per_slot)

  def reserve(self, slot: int, tokens: int):
    """Books enough pages for `slot` to grow to `tokens` tokens; ValueError when they are not available."""
    pages = self.pages_for(tokens) - self._held[slot]
    if pages > self.available + self._reserved[slot] or self.pages_for(tokens) > self.max_pages_per_slot:
      raise ValueError(f"cannot reserve {pages} pages for slot {slot}: {self.available} available")
    self._reserved[slot] = max(pages, 0)

  def ensure(self, slot: int, tokens: int):
    """Gives `slot` pages for its first `tokens` tokens (taking booked pages first); ValueError when out of pages."""
    need = self.pages_for(tokens) - self._held[slot]
    if need <= 0:
      return
    if self._held[slot] + need > self.max_pages_per_slot:
      raise ValueError(f"slot {slot}: {tokens} tokens exceed {self.max_pages_per_slot} pages per slot")
    if need > len(self._free) + len(self._idle) or need > self.available + self._reserved[slot]:
      raise ValueError(f"slot {slot}: out of KV pages ({self.available} free, {need} needed; pagedattn_num_pages)")
    for _ in range(need):
      self.table[slot, self._held[slot]] = self._take()
      self._held[slot] += 1
    self._reserved[slot] = max(self._reserved[slot] - need, 0)
    self.version += 1

  def _take(self) -> int:
    """A page to write: a free one, else the least recently used idle cached page (forgetting its block)."""
    if self._free:
      return self._free.pop()
    page, _ = self._idle.popitem(last=False)
    block = self._block_of.pop(page)
    del self._page_of[block]
    del self._block_ids[self._key_of.pop(block)]
    return page

  def release(self, slot: int):
    """Returns the pages of `slot` (cached ones stay cached, idle once no slot holds them) and drops its
    reservation."""
    held = self._held[slot]
    for page in (int(p) for p in self.table[slot, :held][::-1]):
      if page not in self._block_of:
        self._free.append(page)
        continue
      self._refs[page] -= 1
      if self._refs[page] == 0:
        del self._refs[page]
        self._idle[page] = None
    self.table[slot] = NULL_PAGE
    self._held[slot] = 0
    self._reserved[slot] = 0
    if held:
      self.version += 1

  def held(self, slot: int) -> int:
    return self._held[slot]

  # ------------------------------------------------------------------ prefix caching

  def _blocks(self, tokens: Sequence[int], count: int):
    """(block key, block id or None) of the first `count` full blocks of `tokens`, stopping at the first unknown."""
    per, parent = self.tokens_per_page, -1
    for i in range(count):
      key = (parent, tuple(int(t) for t in tokens[i * per : (i + 1) * per]))
      block = self._block_ids.get(key)
      yield key, block
      if block is None:
        return
      parent = block

  def match(self, prompt: Sequence[int]) -> list[int]:
    """Cached pages holding the longest run of the prompt's leading full blocks, leaving at least its last token to
    compute (its logits sample the first new token)."""
    pages = []
    for _, block in self._blocks(prompt, (len(prompt) - 1) // self.tokens_per_page):
      if block is None:
        break
      pages.append(self._page_of[block])
    return pages

  def share(self, slot: int, pages: Sequence[int]):
    """Puts cached `pages` (from match) first in `slot`'s empty table row, taking a reference to each."""
    if self._held[slot]:
      raise ValueError(f"slot {slot} already holds pages")
    for i, page in enumerate(pages):
      self._idle.pop(page, None)
      self._refs[page] += 1
      self.table[slot, i] = page
    self._held[slot] = len(pages)
    self._reserved[slot] = max(self._reserved[slot] - len(pages), 0)
    self.hit_tokens += len(pages) * self.tokens_per_page
    if pages:
      self.version += 1

  def new_pages_for(self, tokens: int, shared: Sequence[int]) -> int:
    """Pages a request needs beyond the cached `shared` ones to grow to `tokens`, counting idle shared pages, which
    sharing takes out of the evictable pool."""
    return self.pages_for(tokens) - len(shared) + sum(p in self._idle for p in shared)

  def register(self, slot: int, prompt: Sequence[int]):
    """Records the full blocks of `slot`'s prompt (its pages in table order) for later prompts to match."""
    per = self.tokens_per_page
    parent = -1
    for i in range(len(prompt) // per):
      key = (parent, tuple(int(t) for t in prompt[i * per : (i + 1) * per]))
      block = self._block_ids.get(key)
      page = int(self.table[slot, i])
      if block is None and page not in self._block_of:
        block, self._next_block = self._next_block, self._next_block + 1
        self._block_ids[key], self._key_of[block] = block, key
        self._page_of[block], self._block_of[page] = page, block
        self._refs[page] += 1
      elif block is None or self._page_of[block] != page:
        return  # the same block computed twice at once: this copy stays private (freed with the slot)
      parent = block
