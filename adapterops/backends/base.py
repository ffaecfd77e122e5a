"""What every backend provides.

A backend is a small object that says whether it can serve an op for given inputs and, when it
cannot, returns the reasons (plain sentences, shown to users by the dispatcher and by
`python -m adapterops.info`). Ops are methods named after the op family (`lowrank`, `routed`):
`lowrank_forward`, `lowrank_backward`, with `lowrank_reasons` answering the support question.
"""
from typing import Optional


class Backend:
    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all in this process (None when it can)."""
        return None

    def reasons(self, op: str, **inputs) -> list[str]:
        """Why this backend cannot serve `op` for these inputs; empty when it can."""
        reason = self.unavailable_reason()
        if reason is not None:
            return [reason]
        check = getattr(self, f"{op}_reasons", None)
        if check is None:
            return [f"backend {self.name!r} does not implement op {op!r}"]
        return check(**inputs)

    def __repr__(self) -> str:
        return f"<adapterops backend {self.name!r}>"
