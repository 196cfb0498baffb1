"""rightfoot-poller: Rightfoot balance batches as Kafka events, exactly once."""

__version__ = "0.1.0"


def main() -> int:
    """The ``rightfoot-poller`` command (``service.cli.main``).

    Loading the command takes most of a second; a Ctrl-C meanwhile exits 130 quietly,
    as it does once the command runs, instead of printing the traceback of an import.
    """
    try:
        from service.cli import main as command
    except KeyboardInterrupt:
        return 130
    return command()
