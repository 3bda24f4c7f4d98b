-- The roles of docs/security.md, "PostgreSQL": the external tables' writer holds only the
-- grants it needs (it owns what it creates, and nothing else); readers are granted SELECT on
-- their tables by the writer.
CREATE ROLE miroir_writer LOGIN PASSWORD 'miroir-writer';
CREATE ROLE app_reader;
GRANT CONNECT, CREATE ON DATABASE app TO miroir_writer;
GRANT USAGE, CREATE ON SCHEMA public TO miroir_writer;
