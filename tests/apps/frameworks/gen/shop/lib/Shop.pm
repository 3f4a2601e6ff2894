package Shop;
use Dancer2;

our $VERSION = '0.1';

get '/' => sub { "shop " . __PACKAGE__ . " " . config->{appdir} . "\n" };

get '/json' => sub { send_as JSON => { framework => 'Dancer2', app => 'shop' } };

true;
