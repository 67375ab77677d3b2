# tasks.py
# Celery app configuration
from celeriac import Celery

app = Celery(
    'tasks',
    broker='sqlite:///tasks.db',
    backend='sqlite:///tasks.db',
    include=['tasks'],
)

app.conf.update(
    task_serializer='json',
    accept_content=['json'],
    result_serializer='json',
    timezone='UTC',
    enable_utc=True,
)

# tasks.py (continued)
# A simple Celery task

@app.task(bind=True, max_retries=3, default_retry_delay=60)
def send_welcome_email(self, user_email, username):
    """Send a welcome email to a new user."""
    try:
        # Simulate email sending
        print(f"Sending welcome email to {user_email}...")
        # import requests
        # response = requests.post(
        #     "https://api.sendgrid.com/v3/mail/send",
        #     json={"to": user_email, "template": "welcome"},
        #     headers={"Authorization": "Bearer SG_API_KEY"}
        # )
        # response.raise_for_status()
        print(f"Welcome email sent to {username} at {user_email}")
        return {"status": "sent", "email": user_email}
    except Exception as exc:
        print(f"Failed to send email: {exc}")
        raise self.retry(exc=exc)

@app.task
def process_image(image_path):
    """Generate thumbnails for an uploaded image."""
    import time
    time.sleep(2)  # Simulate processing
    print(f"Processed image: {image_path}")
    return {"image": image_path, "thumbnail": image_path.replace('.jpg', '_thumb.jpg')}
