-- pgbridge chat schema (spec 003, "Schema Documentation"), idempotent throughout.
--
-- Applied by daemon/schema.py inside one transaction, under an advisory lock, with
-- search_path set to the target schema (public, or test with --test). Nothing here names a
-- schema: every object lands in the target schema. Tables are ordered by dependency level
-- (seed 000): a table only references tables of a lower level.
--
-- Changes to a table that already exists never go here (CREATE TABLE IF NOT EXISTS would skip
-- them on an existing database): they go to sql/migrations/, which also upgrades databases
-- created from the bare spec.

-- Ledger of sql/migrations/: one row per applied file; checksum is the SHA-256 of its bytes.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Ledger of the extensions below that an apply into this schema created (it did not exist in
-- the database before): setup_db.py --rollback --drop-extensions drops those and only those
-- (daemon/rollback.py). An extension that was already there is the user's, and is not recorded.
CREATE TABLE IF NOT EXISTS schema_extensions (
    name TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Extensions named by the spec: created when the server has them (contrib installed, enough
-- privilege), skipped with a notice otherwise. Nothing below depends on them.
DO $$
DECLARE
    ext text;
BEGIN
    FOREACH ext IN ARRAY ARRAY['uuid-ossp', 'pgcrypto', 'citext'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = ext) THEN
            BEGIN
                EXECUTE format('CREATE EXTENSION IF NOT EXISTS %I', ext);
                INSERT INTO schema_extensions (name) VALUES (ext) ON CONFLICT (name) DO NOTHING;
            EXCEPTION WHEN OTHERS THEN
                RAISE NOTICE 'pgbridge: extension % not available (%), skipped', ext, SQLERRM;
            END;
        END IF;
    END LOOP;
END
$$;

-- ULID (Crockford base32, 26 characters): 48-bit millisecond time + 80 random bits taken from
-- gen_random_uuid() (core since PostgreSQL 13, CSPRNG, no extension needed). Default key of
-- every table; Python code generates its own with python-ulid.
CREATE OR REPLACE FUNCTION gen_ulid() RETURNS varchar(26)
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
DECLARE
    alphabet CONSTANT text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    rnd bytea := uuid_send(gen_random_uuid());
    result text := '';
    acc bigint;
    start int;
BEGIN
    FOR i IN 1..10 LOOP
        result := substr(alphabet, (ms & 31)::int + 1, 1) || result;
        ms := ms >> 5;
    END LOOP;
    -- bytes 0-4 and 10-14 of a v4 UUID are fully random (6 and 8 carry version and variant)
    FOREACH start IN ARRAY ARRAY[0, 10] LOOP
        acc := 0;
        FOR i IN 0..4 LOOP
            acc := (acc << 8) | get_byte(rnd, start + i);
        END LOOP;
        FOR i IN REVERSE 7..0 LOOP
            result := result || substr(alphabet, ((acc >> (5 * i)) & 31)::int + 1, 1);
        END LOOP;
    END LOOP;
    RETURN result;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Level 0: no foreign keys
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS users (
    id VARCHAR(26) PRIMARY KEY DEFAULT gen_ulid(),
    auth0_id VARCHAR(128) UNIQUE NOT NULL,
    email VARCHAR(255) UNIQUE NOT NULL,
    username VARCHAR(255) NOT NULL,
    full_name VARCHAR(255),
    avatar_url TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    deleted_at TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS channels (
    id VARCHAR(26) PRIMARY KEY DEFAULT gen_ulid(),
    name VARCHAR(255) NOT NULL,
    description TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    deleted_at TIMESTAMPTZ
);

-- ---------------------------------------------------------------------------------------------
-- Level 1: reference users and/or channels
-- ---------------------------------------------------------------------------------------------

-- A user's messages are kept when the user is removed only by soft delete (deleted_at):
-- hard-deleting a user who still has messages is refused (RESTRICT).
CREATE TABLE IF NOT EXISTS messages (
    id VARCHAR(26) PRIMARY KEY DEFAULT gen_ulid(),
    channel_id VARCHAR(26) NOT NULL
        CONSTRAINT messages_channel_id_fkey REFERENCES channels(id) ON DELETE CASCADE,
    user_id VARCHAR(26) NOT NULL
        CONSTRAINT messages_user_id_fkey REFERENCES users(id) ON DELETE RESTRICT,
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    deleted_at TIMESTAMPTZ,
    metadata JSONB
);

CREATE TABLE IF NOT EXISTS channel_members (
    channel_id VARCHAR(26) NOT NULL
        CONSTRAINT channel_members_channel_id_fkey REFERENCES channels(id) ON DELETE CASCADE,
    user_id VARCHAR(26) NOT NULL
        CONSTRAINT channel_members_user_id_fkey REFERENCES users(id) ON DELETE CASCADE,
    role VARCHAR(50) NOT NULL DEFAULT 'member'
        CONSTRAINT channel_members_role_check CHECK (role IN ('owner', 'admin', 'member', 'guest')),
    joined_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (channel_id, user_id)
);

CREATE TABLE IF NOT EXISTS user_settings (
    user_id VARCHAR(26) PRIMARY KEY
        CONSTRAINT user_settings_user_id_fkey REFERENCES users(id) ON DELETE CASCADE,
    theme VARCHAR(50) DEFAULT 'light'
        CONSTRAINT user_settings_theme_check CHECK (theme IN ('light', 'dark', 'system')),
    notifications_enabled BOOLEAN DEFAULT true,
    preferences JSONB DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS user_status (
    user_id VARCHAR(26) PRIMARY KEY
        CONSTRAINT user_status_user_id_fkey REFERENCES users(id) ON DELETE CASCADE,
    status VARCHAR(50) NOT NULL DEFAULT 'offline'
        CONSTRAINT user_status_status_check
        CHECK (status IN ('online', 'away', 'busy', 'offline')),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    custom_status TEXT
);

-- The spec's columns only; the columns resume needs (room_id, last_seq) and the one-row-per
-- user/room/sync_type key come from sql/migrations/0002_sync_state_resume.sql.
CREATE TABLE IF NOT EXISTS sync_state (
    id VARCHAR(26) PRIMARY KEY DEFAULT gen_ulid(),
    user_id VARCHAR(26) NOT NULL
        CONSTRAINT sync_state_user_id_fkey REFERENCES users(id) ON DELETE CASCADE,
    last_sync TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    sync_type VARCHAR(50) NOT NULL
        CONSTRAINT sync_state_sync_type_check
        CHECK (sync_type IN ('full', 'incremental', 'events')),
    metadata JSONB
);

-- ---------------------------------------------------------------------------------------------
-- Level 2: reference messages
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS reactions (
    id VARCHAR(26) PRIMARY KEY DEFAULT gen_ulid(),
    message_id VARCHAR(26) NOT NULL
        CONSTRAINT reactions_message_id_fkey REFERENCES messages(id) ON DELETE CASCADE,
    user_id VARCHAR(26) NOT NULL
        CONSTRAINT reactions_user_id_fkey REFERENCES users(id) ON DELETE CASCADE,
    emoji VARCHAR(50) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (message_id, user_id, emoji)
);

CREATE TABLE IF NOT EXISTS files (
    id VARCHAR(26) PRIMARY KEY DEFAULT gen_ulid(),
    message_id VARCHAR(26)
        CONSTRAINT files_message_id_fkey REFERENCES messages(id) ON DELETE CASCADE,
    name VARCHAR(255) NOT NULL,
    type VARCHAR(100) NOT NULL,
    size BIGINT NOT NULL CONSTRAINT files_size_check CHECK (size >= 0),
    url TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS message_reads (
    message_id VARCHAR(26) NOT NULL
        CONSTRAINT message_reads_message_id_fkey REFERENCES messages(id) ON DELETE CASCADE,
    user_id VARCHAR(26) NOT NULL
        CONSTRAINT message_reads_user_id_fkey REFERENCES users(id) ON DELETE CASCADE,
    read_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (message_id, user_id)
);

-- ---------------------------------------------------------------------------------------------
-- Indexes (on existing databases too: every one is IF NOT EXISTS)
-- ---------------------------------------------------------------------------------------------

-- A room's live messages newest first, for keyset pagination: WHERE channel_id = $1 AND
-- (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT n.
CREATE INDEX IF NOT EXISTS messages_channel_created_idx
    ON messages (channel_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS messages_user_idx ON messages (user_id);
-- Rooms of a user (the primary key leads with channel_id).
CREATE INDEX IF NOT EXISTS channel_members_user_idx ON channel_members (user_id);
-- Reactions of a message: served by the UNIQUE (message_id, user_id, emoji) index.
CREATE INDEX IF NOT EXISTS reactions_user_idx ON reactions (user_id);
CREATE INDEX IF NOT EXISTS files_message_idx ON files (message_id);
-- Reads of a user, most recent first.
CREATE INDEX IF NOT EXISTS message_reads_user_idx ON message_reads (user_id, read_at DESC);
CREATE INDEX IF NOT EXISTS sync_state_user_idx ON sync_state (user_id);
-- Live rows only.
CREATE INDEX IF NOT EXISTS users_live_username_idx ON users (username) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS channels_live_name_idx ON channels (name) WHERE deleted_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Change log (DESIGN.md, "The event log is the truth; NOTIFY is the doorbell"). Written only by
-- the capture triggers of sql/triggers/, which run as the owner (SECURITY DEFINER), read by the
-- daemon. No foreign key: a room's events outlive the room (its deletion is itself an event).
-- Only the owner may write these tables: the application role gets no privilege on them, the
-- bridge role reads them and prunes change_events (daemon/schema.py, grant_bridge).
-- ---------------------------------------------------------------------------------------------

-- Per-room counter. The trigger bumps it with an UPDATE (a room's first event creates it); the row
-- lock that takes is held until commit, so within a room seq order is commit order, and a
-- rolled-back transaction gives its number back: seqs are 1, 2, 3, ... with no hole. Every bump
-- is a HOT update (last_seq is not indexed; bench/write_overhead.py --profile counts them).
CREATE TABLE IF NOT EXISTS change_sequences (
    room_id VARCHAR(26) PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS change_events (
    room_id VARCHAR(26) NOT NULL,
    seq BIGINT NOT NULL,
    table_name TEXT NOT NULL,
    op TEXT NOT NULL CONSTRAINT change_events_op_check CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    row_id TEXT NOT NULL,
    payload JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (room_id, seq)
);
-- Retention prunes by age; rows arrive in created_at order, so a BRIN index is enough: it costs
-- the writers nothing measurable, and a WAL record of 72 bytes per row only while the last block
-- range is already summarised (after a VACUUM, until inserts move past it).
CREATE INDEX IF NOT EXISTS change_events_created_brin ON change_events USING brin (created_at);

-- The doorbell lease (sql/triggers/10_change_capture.sql, pgbridge_doorbell; README, "The adaptive
-- doorbell"): until this time, in milliseconds since the Unix epoch on the server's clock, the
-- capture triggers do not NOTIFY and every bridge reads the log on a short interval instead; 0 or
-- any time past: they ring. A sequence rather than a table row because a sequence is not
-- transactional: setval() is seen by every session at once, whatever its snapshot, so a writer
-- that still reads "quiet" is one whose transaction already runs (what pgbridge_doorbell's
-- barrier waits for), and a REPEATABLE READ writer cannot keep reading an old setting.
-- MAXVALUE is the last millisecond of the year 9999: no value makes the writers' comparison fail.
CREATE SEQUENCE IF NOT EXISTS change_doorbell MINVALUE 0 MAXVALUE 253402300799999 START 0 NO CYCLE;

-- The key that signs the capture triggers' NOTIFY payloads (HMAC-SHA256, RFC 2104): any role
-- that can connect may NOTIFY any channel, so the daemon acts only on payloads that carry this
-- key's signature (daemon/signing.py). One row, created once with 32 random bytes
-- (gen_random_uuid() is a CSPRNG; two UUIDs give 244 random bits); ipad and opad are the key
-- padded to SHA-256's 64-byte block, XOR 0x36 and 0x5c, precomputed for the triggers. Readable
-- by the owner and the bridge role only. To rotate: DELETE the row and run setup_db.py again
-- (writes to the chat tables fail in between: pause the writers); running daemons re-read the
-- key every 5 s (docs/topics/security.md).
CREATE TABLE IF NOT EXISTS change_notify_key (
    id BOOLEAN PRIMARY KEY DEFAULT true CONSTRAINT change_notify_key_one_row CHECK (id),
    key BYTEA NOT NULL,
    ipad BYTEA NOT NULL,
    opad BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
DO $$
DECLARE
    k bytea;
    ipad bytea;
    opad bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM change_notify_key) THEN
        k := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
        ipad := k || decode(repeat('00', 32), 'hex');
        opad := ipad;
        FOR i IN 0..63 LOOP
            ipad := set_byte(ipad, i, get_byte(ipad, i) # 54);  -- 0x36
            opad := set_byte(opad, i, get_byte(opad, i) # 92);  -- 0x5c
        END LOOP;
        INSERT INTO change_notify_key (key, ipad, opad) VALUES (k, ipad, opad);
    END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Presence (DESIGN.md, "Presence and ephemeral signals"; README, "Presence and typing"): which
-- bridge instance holds a connection of which user. Written only by the presence functions of
-- sql/triggers/40_presence.sql, which run as the owner; the bridge role calls them and reads.
-- A user is online while some row of presence_sessions names them; an instance renews its lease
-- (expires_at) every third of PGBRIDGE_PRESENCE_LEASE, and any instance deletes the rows of one
-- whose lease has run out, turning its users offline (pgbridge_presence_reap).
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS presence_instances (
    instance_id VARCHAR(26) PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
-- (No index on expires_at: a handful of rows, and every renewal stays a HOT update.)

-- One row per user with at least one connection on the instance (or one closed less than the
-- grace period ago). closed_at is set only when an instance shuts down with the user's last
-- connection already closed: the reaper then takes it, not the shutdown, as the user's last_seen.
CREATE TABLE IF NOT EXISTS presence_sessions (
    instance_id VARCHAR(26) NOT NULL
        CONSTRAINT presence_sessions_instance_fkey REFERENCES presence_instances (instance_id),
    user_id VARCHAR(26) NOT NULL,
    closed_at TIMESTAMPTZ,
    PRIMARY KEY (instance_id, user_id)
);
CREATE INDEX IF NOT EXISTS presence_sessions_user_idx ON presence_sessions (user_id);

-- Ledger of the files applied every time (schema.sql and sql/triggers/): the SHA-256 of each as
-- last applied, so that a run over an unchanged, intact schema changes nothing and takes no lock
-- a writer would wait for (daemon/schema.py).
CREATE TABLE IF NOT EXISTS schema_files (
    file TEXT PRIMARY KEY,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Tables only the owner writes: nobody else gets anything unless setup_db.py grants it.
REVOKE ALL ON change_sequences, change_events, change_notify_key, schema_migrations, schema_files,
    schema_extensions, presence_instances, presence_sessions FROM PUBLIC;
REVOKE ALL ON SEQUENCE change_doorbell FROM PUBLIC;
