"""Media loading: `fetch` gets bytes safely (schemes, addresses, sizes, deadlines), one module per media kind
decodes them with its library (image: Pillow). Every refusal is a MediaError whose message a person can act on."""


class MediaError(ValueError):
    """The request's media cannot be used; `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
