package Blog;
use Dancer2;

our $VERSION = '0.1';

get '/' => sub { "blog " . __PACKAGE__ . " " . config->{appdir} . "\n" };

get '/json' => sub { send_as JSON => { framework => 'Dancer2', app => 'blog' } };

true;
