"""What a knowledge_id may be."""

from __future__ import annotations

from llamaindex_kb.errors import InvalidFieldError, shown

KB_ID_MAX = 200


KB_ID_RULE = (
    f"1 to {KB_ID_MAX} printable characters, without '/' (it could not be addressed in a "
    "URL path), and not '.' or '..'"
)


def validate_knowledge_id(knowledge_id: str, field: str = "knowledge_id", *,
                          creating: bool = True) -> str:
    """Refuse, naming the rule, an id a knowledge base could be created under but then
    not reached by every route (list, delete). An existing base keeps its id (``creating``
    False): one made with '/' before this rule can still be changed from the CLI."""
    unreachable = "/" in knowledge_id or knowledge_id in {".", ".."}
    if (not knowledge_id or len(knowledge_id) > KB_ID_MAX or not knowledge_id.isprintable()
            or (creating and unreachable)):
        raise InvalidFieldError(field, f"must be {KB_ID_RULE}; got {shown(knowledge_id)}")
    return knowledge_id
