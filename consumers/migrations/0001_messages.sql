-- 0001: durable history. Messages are keyed by (room, epoch, stream id); the partition key
-- stream_ts is derived from the stream id's milliseconds, so a redelivered entry always lands in
-- the same partition and conflicts with itself (exactly once).
CREATE TABLE messages (
    room          text        NOT NULL,
    epoch         text        NOT NULL,
    stream_ms     bigint      NOT NULL,
    stream_seq    bigint      NOT NULL,
    stream_ts     timestamptz NOT NULL,
    type          text        NOT NULL,
    sender_id     text,
    content       text,
    message_type  text,
    client_msg_id text,
    metadata      jsonb,
    data          jsonb,
    created_at    timestamptz NOT NULL,
    archived_at   timestamptz NOT NULL DEFAULT now(),
    search        tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(content, ''))) STORED,
    PRIMARY KEY (room, epoch, stream_ms, stream_seq, stream_ts)
) PARTITION BY RANGE (stream_ts);

-- History pages walk one room newest first.
CREATE INDEX messages_room_order ON messages (room, stream_ms DESC, stream_seq DESC);
CREATE INDEX messages_search ON messages USING gin (search);

-- Template for each archiver connection's TEMP staging table (COPY lands there, then moves with
-- INSERT ... ON CONFLICT DO NOTHING). Never written itself.
CREATE UNLOGGED TABLE messages_staging (LIKE messages INCLUDING DEFAULTS EXCLUDING GENERATED);
ALTER TABLE messages_staging DROP COLUMN search;

-- Read receipts: the newest stream id each user has read in each room (never moves back).
CREATE TABLE read_receipts (
    room       text        NOT NULL,
    user_id    text        NOT NULL,
    up_to_ms   bigint      NOT NULL,
    up_to_seq  bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, user_id)
);

-- One row per room: what a rooms list needs without scanning messages.
CREATE TABLE rooms (
    room            text        PRIMARY KEY,
    kind            text        NOT NULL,
    last_stream_ms  bigint      NOT NULL,
    last_stream_seq bigint      NOT NULL,
    last_sender_id  text,
    last_content    text,
    last_at         timestamptz NOT NULL,
    message_count   bigint      NOT NULL DEFAULT 0
);
