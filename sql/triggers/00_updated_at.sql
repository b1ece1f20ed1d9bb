-- updated_at is kept current by the database, whoever writes (users, channels, messages).

CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- CREATE OR REPLACE TRIGGER: PostgreSQL 14+, as spec 003 requires.
CREATE OR REPLACE TRIGGER users_touch_updated_at
    BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
CREATE OR REPLACE TRIGGER channels_touch_updated_at
    BEFORE UPDATE ON channels FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
CREATE OR REPLACE TRIGGER messages_touch_updated_at
    BEFORE UPDATE ON messages FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
