-- sync_state learns what resume needs (DESIGN.md, "sync_state"): the room and the last seq the
-- user acknowledged in it, one row per user + room + sync_type. Rows from the bare spec keep
-- their data; their room_id is NULL (NULLs never collide in the unique index).

ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS room_id VARCHAR(26)
    CONSTRAINT sync_state_room_id_fkey REFERENCES channels(id) ON DELETE CASCADE;
ALTER TABLE sync_state ADD COLUMN IF NOT EXISTS last_seq BIGINT;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = to_regclass('sync_state')
                     AND conname = 'sync_state_last_seq_check') THEN
        ALTER TABLE sync_state ADD CONSTRAINT sync_state_last_seq_check CHECK (last_seq >= 0);
    END IF;
END
$$;

-- ON CONFLICT (user_id, room_id, sync_type) target of the daemon's batched ack upserts.
CREATE UNIQUE INDEX IF NOT EXISTS sync_state_user_room_type_key
    ON sync_state (user_id, room_id, sync_type);
