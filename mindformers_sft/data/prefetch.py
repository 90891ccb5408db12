"""Host data work overlapped with the step: a thread reads and collates the next batches while the device (or the
CPU kernels, which release the GIL) runs the current one. The order is that of the BatchPlan, unchanged."""
from __future__ import annotations

import queue
import threading

from .sampler import collate

_END = object()


class Prefetcher:
    """Yields (step, epoch, indices, micro_batches) for steps [start, total), `depth` batches ahead."""

    def __init__(self, plan, dataset, start: int, total: int, depth: int = 2):
        self.plan, self.dataset, self.start, self.total = plan, dataset, int(start), int(total)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            order, order_epoch = None, None
            for step in range(self.start, self.total):
                epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = self.plan.order(epoch), epoch
                indices = self.plan.micro_batches(epoch, in_epoch, order)
                micro = [collate([self.dataset[i] for i in idx]) for idx in indices]
                if not self._put((step, epoch, indices, micro)):
                    return
            self._put(_END)
        except BaseException as e:                          # handed to the training thread, raised there
            self._put(e)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
