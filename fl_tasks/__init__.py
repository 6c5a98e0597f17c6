"""Step side of airfed: what runs inside a pod or a local subprocess."""
