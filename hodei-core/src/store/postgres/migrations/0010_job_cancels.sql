-- A cancel asked for a job whose worker's session is with another control plane (or with none,
-- between sessions): the control plane its session is with, now or once it comes back,
-- forwards it to the worker.
ALTER TABLE hodei_job_logs ADD COLUMN cancel text;
