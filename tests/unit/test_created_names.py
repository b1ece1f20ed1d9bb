"""The names the apply checks the ownership of (daemon/schema_files.py, ``created_names``) are
read from the SQL files' CREATE statements: every table and function the catalog check requires
(daemon/schema_check.py) is among them, and a comment is not taken for a statement."""

from __future__ import annotations

from daemon import schema_check
from daemon.rollback import PGBRIDGE_SEQUENCES, PGBRIDGE_TABLES
from daemon.schema_files import created_names


def test_every_table_sequence_and_function_the_schema_needs_is_a_created_name() -> None:
    names = created_names()
    assert set(schema_check.TABLES) | set(PGBRIDGE_TABLES) | set(PGBRIDGE_SEQUENCES) \
        <= names.relations
    assert set(schema_check.FUNCTIONS) <= names.functions
    assert "messages_user_idx" in names.relations  # indexes too


def test_a_comment_is_not_a_created_name() -> None:
    # sql/schema.sql's header says "CREATE TABLE IF NOT EXISTS would skip them"
    assert "would" not in created_names().relations
