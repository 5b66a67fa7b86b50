-- 0002: the audit log, archived from the hub:audit stream by the audit archiver. Keyed by the stream
-- id, so a redelivered entry conflicts with itself (exactly once). Append-only: a trigger refuses
-- UPDATE, DELETE and TRUNCATE for every role, the table owner included.
CREATE TABLE audit_log (
    stream_ms   bigint      NOT NULL,
    stream_seq  bigint      NOT NULL,
    at          timestamptz NOT NULL,
    event       text        NOT NULL,
    who         text,
    ip          text,
    what        text,
    node        text,
    -- Short detail fields (reason, request type, command, ...); never a token or a message body.
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    archived_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_ms, stream_seq)
);

CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_who ON audit_log (who, at) WHERE who IS NOT NULL;
CREATE INDEX audit_log_event ON audit_log (event, at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;
