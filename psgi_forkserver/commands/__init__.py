"""The client commands of `emperor`: they talk to a running Emperor (its
stats socket, its pidfile), and `emperor front` prints nginx's side."""
