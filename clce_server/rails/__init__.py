"""What every operation runs on: the staged endpoint and its stages (endpoint.py), the request's
lease and its one shared-memory resolver (lease.py, shm.py), the scheduler, the host buffer pool
(hostmem.py), the OpenCL devices (device.py), the request record (recording.py), errors and how
they are answered (errors.py, responses.py), and who may call (deps.py)."""
