"""tprocess: the job tasks of the bench's queue group (`task = "sys_tprocess.py:work"`)."""

from work import handle, handle_async


def work(ctx, job):
    handle(job.data)


async def work_async(ctx, job):
    await handle_async(job.data)
