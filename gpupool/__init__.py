"""What the host agent, the gateway and the Jupyter extension agree on, in one place: the
websocket protocol and its codec, limits, kernel states and the time format. The three packages
import this one and never each other; this one imports none of them."""
