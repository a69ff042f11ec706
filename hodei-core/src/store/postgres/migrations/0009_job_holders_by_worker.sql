-- The jobs a worker holds, looked up by worker: when its agent lists what it holds at the start
-- of a session, and before a control plane destroys a worker it adopted.
CREATE INDEX hodei_job_logs_worker ON hodei_job_logs (worker) WHERE result IS NULL;
