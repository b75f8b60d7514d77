"""What the backend and the op report: explain, reports, routing statistics, listeners, memory."""
