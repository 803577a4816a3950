"""Child processes of the data tools (megalign-preprocess, megalign-train-tokenizer) that can
neither outlive nor hang them: the parent alone handles Ctrl-C and stops its children; a child
that dies is reported, never waited for forever.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from typing import Callable, Iterable, Iterator

from megalign.platform.stop_signals import STOP_SIGNALS, raise_interrupted

_FORK = multiprocessing.get_context("fork")


def pipe():
    """(reader, writer) ends of a one-way pipe between this process and a child."""
    return _FORK.Pipe(duplex=False)


def start_process(target, args: tuple, close: Iterable = (), daemon: bool = True,
                  fresh_interpreter: bool = False):
    """Fork a child running ``target(*args)`` that ignores SIGINT and stops on SIGTERM: the
    parent alone handles Ctrl-C (a terminal sends it to the whole process group) and stops its
    children, so none dies in the middle of a message or prints a traceback. A daemon child dies
    of SIGTERM at once; a non-daemon one may start children of its own, so SIGTERM raises
    ``Interrupted`` in it and its ``finally`` blocks stop them and remove its files. ``close``:
    the parent's pipe ends the child must not hold (a reader sees EOF only once every copy of the
    writer is closed). ``fresh_interpreter``: spawn a new Python instead of forking, for a child
    whose native threads would hang in a fork of a process that ran OpenMP (torch) threads."""
    context = multiprocessing.get_context("spawn") if fresh_interpreter else _FORK
    process = context.Process(target=_child, args=(target, args, list(close)), daemon=daemon)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until the child's are set
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return process


def _child(target, args, close) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    daemon = multiprocessing.current_process().daemon
    signal.signal(signal.SIGTERM, signal.SIG_DFL if daemon else raise_interrupted)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for connection in close:
        connection.close()
    try:
        target(*args)
    except BaseException:  # the parent is gone (targets send it their errors): nobody to tell
        os._exit(1)


def stop_processes(processes, grace: float = 10.0) -> None:
    """SIGTERM (see ``start_process``), then SIGKILL for any still alive after ``grace`` s."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=grace)
        if process.is_alive():
            process.kill()
            process.join()


def receive(connection, process, what: str):
    """The next message ``process`` sends on ``connection``; an exception it sends is raised
    here, and its death is a RuntimeError. SIGINT/SIGTERM interrupt the wait."""
    multiprocessing.connection.wait([connection, process.sentinel])
    try:
        message = connection.recv()
    except (EOFError, OSError):
        raise died(process, what) from None
    if isinstance(message, BaseException):
        raise message
    return message


def died(process, what: str) -> RuntimeError:
    process.join(timeout=10)
    if process.exitcode is None:
        status = "its pipe closed"
    elif process.exitcode < 0:
        status = f"killed by {signal.Signals(-process.exitcode).name}; out of memory?"
    else:
        status = f"exit code {process.exitcode}"
    return RuntimeError(f"the {what} (pid {process.pid}) died ({status})")


class OrderedWorkers:
    """``count`` forked processes applying ``function`` to tasks; results come in task order.

    Task i goes to worker i % count and each worker answers its tasks in order, so reading the
    answers round-robin restores the input order without sorting. Why not multiprocessing.Pool:
    its ``imap`` reads the whole input ahead of the workers, and when a worker dies holding the
    shared queue's lock (Ctrl-C reaches every worker), ``terminate()`` waits for that lock
    forever. Here each worker has its own pipes, which close when either side dies, and stopping
    is killing. Use as a context manager: leaving it on an error stops the workers.
    """

    def __init__(self, count: int, function: Callable, what: str,
                 initializer: Callable[[], None] = lambda: None):
        self.what = what
        self._workers: list = []  # (process, task writer, result reader)
        try:
            for _ in range(count):
                self._start(function, initializer)
        except BaseException:
            self.kill()
            raise

    def _start(self, function, initializer) -> None:
        task_reader, task_writer = pipe()
        result_reader, result_writer = pipe()
        parent_ends = [end for _, *ends in self._workers for end in ends]
        process = start_process(_serve, (function, initializer, task_reader, result_writer),
                                close=[*parent_ends, task_writer, result_reader])
        self._workers.append((process, task_writer, result_reader))
        task_reader.close()
        result_writer.close()

    def __enter__(self) -> "OrderedWorkers":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            for _, task_writer, _ in self._workers:
                task_writer.close()  # end of tasks: each worker finishes and exits
            for process, _, _ in self._workers:
                process.join(timeout=10)
        self.kill()

    def map(self, tasks: Iterable, in_flight_per_worker: int = 2) -> Iterator:
        """Results of ``tasks`` in order. When reading a task fails, the results of the tasks
        before it come first, so the first problem in input order is the one reported."""
        count, sent, received, failure = len(self._workers), 0, 0, None
        iterator = iter(tasks)
        while True:
            try:
                task = next(iterator)
            except StopIteration:
                break
            except Exception as err:
                failure = err
                break
            if sent - received == in_flight_per_worker * count:
                yield self._receive(received)
                received += 1
            process, task_writer, _ = self._workers[sent % count]
            try:
                task_writer.send(task)
            except OSError:  # its pipe broke: it died
                raise died(process, self.what) from None
            sent += 1
        for index in range(received, sent):
            yield self._receive(index)
        if failure is not None:
            raise failure

    def _receive(self, index: int):
        process, _, result_reader = self._workers[index % len(self._workers)]
        return receive(result_reader, process, self.what)

    def kill(self) -> None:
        stop_processes([process for process, _, _ in self._workers])
        for _, task_writer, result_reader in self._workers:
            task_writer.close()
            result_reader.close()


def _serve(function, initializer, tasks, results) -> None:
    """A worker: tasks are read by a thread of their own, so the parent's sends never wait for
    this worker to finish sending a result the parent is not reading yet (a deadlock)."""
    initializer()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_tasks, args=(tasks, inbox), daemon=True).start()
    while (task := inbox.get()) is not None:
        try:
            result = function(task)
        except Exception as err:
            result = err
        results.send(result)


def _read_tasks(tasks, inbox) -> None:
    try:
        while True:
            inbox.put(tasks.recv())
    except (EOFError, OSError):
        inbox.put(None)
