"""Host-side bookkeeping of the paged KV cache: which fixed-size pages each decode slot holds.

The device holds `num_pages` pages of `tokens_per_page` tokens per layer; a slot's page table row lists its pages in
token order. Page 0 is never handed out: unused table entries (and empty slots, which still step with the batch)
point at it, so their writes land in a scratch page no sequence reads unmasked.

Pages are taken as a sequence grows (`ensure`) and returned when it ends (`release`). `reserve` books the pages a
request may still need so admission can refuse a request up front instead of running out mid-decode.
"""

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

  @property
  def capacity(self) -> int:
    """Pages that can ever be allocated (page 0 excluded)."""
    return self.num_pages - 1

  @property
  def used(self) -> int:
    return self.capacity - len(self._free)

  @property
  def available(self) -> int:
    """Free pages not booked by a reservation."""
    return len(self._free) - sum(self._reserved)

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
    if need > len(self._free) or need > self.available + self._reserved[slot]:
      raise ValueError(f"slot {slot}: out of KV pages ({len(self._free)} free, {need} needed; pagedattn_num_pages)")
    for _ in range(need):
      self.table[slot, self._held[slot]] = self._free.pop()
      self._held[slot] += 1
    self._reserved[slot] = max(self._reserved[slot] - need, 0)
    self.version += 1

  def release(self, slot: int):
    """Returns every page of `slot` to the free list and drops its reservation."""
    held = self._held[slot]
    self._free.extend(int(p) for p in self.table[slot, :held][::-1])
    self.table[slot] = NULL_PAGE
    self._held[slot] = 0
    self._reserved[slot] = 0
    if held:
      self.version += 1

  def held(self, slot: int) -> int:
    return self._held[slot]
