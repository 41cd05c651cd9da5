"""xcit-ssl: self-supervised pretraining of XCiT vision transformers."""

__version__ = "0.1.0"
