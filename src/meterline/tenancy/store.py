"""What tenancy needs from storage. ``meterline.storage.tenancy_store`` and ``token_store`` implement it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from meterline.tenancy.models import (
    ApiKey,
    CreditGrant,
    Identifier,
    Organization,
    RefreshToken,
    TokenFamily,
    Workspace,
)


class TenancyStore(Protocol):
    def add_organization(self, org: Organization) -> None: ...
    def update_organization(self, org: Organization, at_us: int) -> None: ...
    def get_organization(self, org_id: str) -> Organization | None: ...
    def list_organizations(self, *, limit: int, offset: int) -> tuple[Sequence[Organization], int]: ...
    def add_workspace(self, ws: Workspace) -> None: ...
    def get_workspace(self, ws_id: str) -> Workspace | None: ...
    def list_workspaces(
        self, *, organization_id: str | None, limit: int, offset: int
    ) -> tuple[Sequence[Workspace], int]: ...
    def add_key(self, key: ApiKey, key_hash: str) -> None: ...
    def get_key(self, key_id: str) -> ApiKey | None: ...
    def find_key_by_hash(self, key_hash: str) -> ApiKey | None: ...
    def list_keys(
        self, *, workspace_id: str | None, organization_id: str | None, limit: int, offset: int
    ) -> tuple[Sequence[ApiKey], int]: ...
    def revoke_key(self, key_id: str, at_us: int) -> None: ...
    def touch_key(self, key_id: str, at_us: int) -> None: ...
    def add_credit_grant(self, grant: CreditGrant) -> None: ...
    def list_credit_grants(self, organization_id: str) -> Sequence[CreditGrant]: ...
    def set_identifier_limits(
        self,
        workspace_id: str,
        identifier_id: str,
        organization_id: str,
        limits: Mapping[str, int] | None,
        at_us: int,
    ) -> None:
        """Create the identifier or replace its limits (``None``: no limits of its own)."""
        ...

    def register_identifier(
        self, workspace_id: str, identifier_id: str, organization_id: str, at_us: int
    ) -> None:
        """Create the identifier without limits unless it exists (then leave it as it is)."""
        ...

    def get_identifier(self, workspace_id: str, identifier_id: str) -> Identifier | None: ...


class TokenStore(Protocol):
    def start_family(self, family: TokenFamily, first: RefreshToken) -> None:
        """Store a new family and its first refresh token, in one transaction."""
        ...

    def find_refresh_token(self, token_hash: str) -> tuple[RefreshToken, TokenFamily, ApiKey] | None:
        """The refresh token with its family and the API key that issued it."""
        ...

    def find_family(self, family_id: str) -> tuple[TokenFamily, ApiKey] | None:
        """The family with its issuing key: one indexed look-up, made for every access token."""
        ...

    def rotate(self, token_hash: str, used_at_us: int, successor: RefreshToken) -> bool:
        """Mark ``token_hash`` used and store ``successor``, atomically, if it was still unused. False
        (and nothing written) when it was already used: of two concurrent rotations exactly one wins."""
        ...

    def revoke_family(self, family_id: str, at_us: int) -> None: ...
