"""Who is asking: subject, role and groups. Retrieval and every API route decide on this alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["admin", "user", "service"]


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role = "user"
    groups: tuple[str, ...] = field(default_factory=tuple)
    # A service account may be pinned to one knowledge base (customer-service bots).
    knowledge_base: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def reads_everything(self) -> bool:
        """Administrators see every document; everyone else only what their groups allow."""
        return self.is_admin
