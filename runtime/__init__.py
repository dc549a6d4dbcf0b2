"""talkrt: a MuseTalk-class lip-sync video engine for the NVIDIA stack."""

__version__ = "0.1.0"
