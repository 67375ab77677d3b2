# call_tasks.py
# Demonstrates calling Celery tasks synchronously and asynchronously
from tasks import send_welcome_email, process_image

# Async call — returns immediately
result = send_welcome_email.delay('user@example.com', 'Alice')
print(f"Task ID: {result.id}")
print(f"Task status: {result.status}")

# Wait for result (blocking)
print(f"Result: {result.get(timeout=10)}")

# Async call with arguments
image_result = process_image.delay('/uploads/photo.jpg')
print(f"Image task ID: {image_result.id}")

# Check status without blocking
from celeriac.result import AsyncResult
status = AsyncResult(image_result.id, app=send_welcome_email.app)
print(f"Pending: {status.status}")  # PENDING, STARTED, SUCCESS, FAILURE
