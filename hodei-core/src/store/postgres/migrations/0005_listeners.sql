-- Where each engine's control plane listens for its workers' agents, so that every control
-- plane hands its workers the others' listeners too: an agent whose control plane is gone opens
-- its next session with another. Listed while the engine's lease (hodei_engines) is live.
CREATE TABLE hodei_listeners (
    member text COLLATE "C" PRIMARY KEY,
    registration text NOT NULL,
    session text NOT NULL
);
