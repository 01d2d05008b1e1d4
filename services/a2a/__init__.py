"""Agent2Agent (A2A) interoperability: the gateway that serves the mesh to A2A clients
(``hivewire a2a``) and the adapter agent that brings a remote A2A agent into the mesh.

See docs/interop.md.
"""
